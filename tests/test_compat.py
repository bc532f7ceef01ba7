"""Every private API and error text dpt_scale/compat.py leans on, against the real library: an
upgrade that changes one fails here. (torch.save's full-disk texts and gloo's lost-peer texts are
provoked for real in test_faults.py.)"""
from __future__ import annotations

import pytest
import timm
import torch

from dpt_scale import compat


def test_timm_tells_a_convnet_from_a_model_with_an_image_size():
    with pytest.raises(TypeError) as caught:
        timm.create_model("resnet18", pretrained=False, img_size=32)
    assert compat.timm_has_no_img_size(caught.value)
    assert timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32).patch_embed.img_size == (32, 32)


def test_timm_names_the_tensors_whose_shapes_differ(tmp_path):
    weights = timm.create_model("resnet18", pretrained=False, num_classes=10).state_dict()
    weights["layer1.0.conv1.weight"] = torch.zeros(32, 64, 3, 3)
    torch.save(weights, tmp_path / "w.pt")
    with pytest.raises(RuntimeError) as caught:
        timm.create_model("resnet18", pretrained=True, num_classes=10,
                          pretrained_cfg_overlay=dict(file=str(tmp_path / "w.pt")))
    assert compat.timm_shape_mismatch(caught.value) == ["layer1.0.conv1.weight"]
    assert compat.timm_shape_mismatch(RuntimeError("another failure")) is None


def test_storage_use_count_counts_the_views_of_a_buffer():
    buffer = torch.zeros(16)
    storage = buffer.untyped_storage()
    alone = compat.storage_use_count(storage)
    view = buffer.view(4, 4)
    assert compat.storage_use_count(storage) == alone + 1
    array = view.numpy()  # outlives the tensor: what a weakref could not tell
    del view
    assert compat.storage_use_count(storage) == alone + 1
    del array
    assert compat.storage_use_count(storage) == alone


def test_deepspeed_still_has_the_shared_memory_comm_op_to_skip():
    import deepspeed.ops

    assert "deepspeed_shm_comm" in deepspeed.ops.__compatible_ops__
    compat.skip_deepspeed_shm_comm()
    assert deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] is False


def test_submitit_renders_the_sbatch_script(tmp_path):
    from dpt_scale.cli.submit import _executor

    executor = _executor(tmp_path / "slurm", max_timeouts=3, dry_run=True)
    executor.update_parameters(time=30, nodes=2)
    script = compat.sbatch_script(executor)
    assert script.startswith("#!/bin/bash\n") and "#SBATCH --nodes=2" in script and "#SBATCH --time=30" in script
    assert not (tmp_path / "slurm").exists()
