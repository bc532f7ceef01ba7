import os

# Before anything imports torch or DeepSpeed: a CPU-only, offline, two-core test machine.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402

from helpers import make_shard_set  # noqa: E402


@pytest.fixture(scope="session")
def mnist_root(tmp_path_factory):
    """The embedded MNIST imported once per session (as `dpt-scale data import mnist` does)."""
    from dpt_scale.cli import main

    root = tmp_path_factory.mktemp("mnist")
    assert main(["-q", "data", "import", "mnist", "--out", str(root), "--workers", "2"]) == 0
    return root


@pytest.fixture
def uneven_set(tmp_path):
    """A shard set of 5 shards of different sizes (7, 31, 3, 50, 19 samples), 4 classes."""
    return make_shard_set(tmp_path / "uneven", [7, 31, 3, 50, 19])
