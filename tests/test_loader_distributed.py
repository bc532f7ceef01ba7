"""Two real processes (torch.distributed.run, gloo) read a shard set with uneven shards."""
import json
import textwrap

import pytest

from helpers import make_shard_set, torchrun

SCRIPT = textwrap.dedent("""
    import json, sys
    from datetime import timedelta
    import torch, torch.distributed as dist
    from dpt_scale.recipe.schema import Loader
    from dpt_scale.shards.loader import ShardLoader

    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    loader = ShardLoader(sys.argv[1], batch_size=4, rank=dist.get_rank(), world_size=dist.get_world_size(),
                         settings=Loader(workers=int(sys.argv[3]), streams=4), seed=0)
    steps, keys = 0, []
    for epoch in range(2):
        for batch in loader.epoch(epoch):
            one = torch.ones(1)
            dist.all_reduce(one)  # a collective every step: a rank that ran short would hang here
            steps += 1
            keys += [(epoch, k) for k in batch["key"]]
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, {"rank": dist.get_rank(), "steps": steps, "keys": keys})
    if dist.get_rank() == 0:
        json.dump(every, open(sys.argv[2], "w"))
    dist.destroy_process_group()
""")


@pytest.mark.parametrize("workers", [0, 2])
def test_two_ranks_get_equal_disjoint_work_from_uneven_shards(tmp_path, workers):
    shards = make_shard_set(tmp_path / "set", [7, 31, 3, 50, 19])  # 110 samples, very uneven shards
    script = tmp_path / "ranks.py"
    script.write_text(SCRIPT)
    torchrun(script, str(shards), str(tmp_path / "out.json"), str(workers))
    ranks = json.loads((tmp_path / "out.json").read_text())
    assert ranks[0]["steps"] == ranks[1]["steps"] == 2 * 13  # 110 // 2 = 55 -> 13 batches of 4, per epoch
    for epoch in (0, 1):
        per_rank = [{k for e, k in r["keys"] if e == epoch} for r in ranks]
        assert len(per_rank[0]) == len(per_rank[1]) == 52 and not per_rank[0] & per_rank[1]
