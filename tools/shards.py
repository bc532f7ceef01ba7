"""Inspect shard sets without the console script: `python tools/shards.py ls|stat|verify|show DIR`.
The same as `dpt-scale shards ...`."""
import sys

from dpt_scale.cli import main

if __name__ == "__main__":
    sys.exit(main(["shards", *sys.argv[1:]]))
