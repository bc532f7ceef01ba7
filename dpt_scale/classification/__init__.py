"""Stage-1 / stage-4 training methods, by recipe name (`classifier.method`)."""
from dpt_scale.classification.fixmatch import FixMatch
from dpt_scale.classification.linear_probe import LinearProbe
from dpt_scale.classification.supervised import Supervised

METHODS = {"fixmatch": FixMatch, "linear_probe": LinearProbe, "supervised": Supervised}

__all__ = ["METHODS"]
