"""`dpt-scale run`: the stages in order, completion markers, and the run report."""
