"""Stage 3: generating pseudo images into shards (plan: who is who; writer: background I/O)."""
