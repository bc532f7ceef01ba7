"""Where the code leans on a library's private API or on the text of its errors, in one place.

Each entry is used for a reason no public API serves (said beside it), and tests/test_compat.py
calls the real library for every one, so an upgrade that changes them fails there, loudly, not as
a silent fallback in a run.
"""
from __future__ import annotations

import re

# torch.save's zip writer reports a full disk (or quota, or file-size limit) as a RuntimeError with
# one of these texts, and no errno.
TORCH_SAVE_NO_SPACE = ("unexpected pos", "file write failed")
# gloo reports a rank that went away as a plain RuntimeError naming the socket error.
GLOO_LOST_PEER = ("Connection reset by peer", "Connection closed by peer", "Broken pipe", "Connection refused")
# CPython 3.11's AST constructor can raise a spurious SystemError under concurrent parses
# (python/cpython#106905); numpy's .npy header parse hits it. Goes with Python 3.11.
SPURIOUS_AST_ERROR = "recursion depth mismatch"


def torch_save_ran_out_of_space(exc: RuntimeError) -> bool:
    return any(text in str(exc) for text in TORCH_SAVE_NO_SPACE)


def timm_has_no_img_size(exc: TypeError) -> bool:
    """timm.create_model(name, img_size=...) of a convnet: its constructor takes no img_size."""
    return "img_size" in str(exc)


def timm_shape_mismatch(exc: RuntimeError) -> list[str] | None:
    """The tensor names of a load_state_dict size mismatch inside timm.create_model, else None."""
    return re.findall(r"size mismatch for ([^:]+):", str(exc)) if "state_dict" in str(exc) else None


def storage_use_count(storage) -> int:
    """How many tensors and storage objects share this torch.UntypedStorage's memory. No public API
    tells it: a weakref on the tensor cannot (tensor.numpy() outlives the tensor)."""
    import torch

    return torch._C._storage_Use_Count(storage._cdata)


def skip_deepspeed_shm_comm() -> None:
    """On CPU, DeepSpeed compiles a shared-memory all-reduce op (~50 s) on first use unless its
    table of compatible ops says no; gloo does the same job with nothing to compile."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def sbatch_script(executor) -> str:
    """The sbatch script submitit would submit, for --dry-run: submitit renders it only privately."""
    return executor._make_submission_file_text(executor._submitit_command_str, "dry-run")
