"""`diffusion.init`: reference U-ViT checkpoints (built here from our own model, never downloaded)
loaded as the same network, every architectural mismatch one line, stage 2 starting from the file
(weights, EMA and bf16 master weights), resuming without it, and `train.steps: 0` to sample from it."""
from __future__ import annotations

import pytest
import torch
import yaml

from dpt_scale.diffusion.init import load_init
from dpt_scale.errors import RecipeError, UserError
from dpt_scale.models import build_uvit
from dpt_scale.models.uvit import UViT, timestep_embedding
from dpt_scale.models.uvit_reference import from_reference, to_reference
from dpt_scale.recipe import load_recipe
from dpt_scale.shards.manifest import Manifest
from helpers import assert_one_line_error, make_shard_set, run_cli

SETTINGS = {"size": "tiny", "img_size": 8, "patch_size": 2, "in_chans": 1, "num_classes": 4, "conv": True,
            "mlp_time_embed": False, "qkv_bias": False, "attention": "math", "grad_checkpointing": False}


class ReferenceOrder(UViT):
    """Our U-ViT with its extra tokens in the reference's order, [class, time, patches]."""

    def forward(self, x, t, y):
        tokens = self.patch_embed(x)
        time = self.time_embed(timestep_embedding(t, self.embed_dim))
        x = torch.cat([self.label_emb(y)[:, None], time[:, None], tokens], dim=1) + self.pos_embed
        kept = []
        for block in self.in_blocks:
            x = block(x)
            kept.append(x)
        x = self.mid_block(x)
        for block in self.out_blocks:
            x = block(x, kept.pop())
        return self.final_layer(self._unpatchify(self.decoder_pred(self.norm(x))[:, self.extras:]))


def trained_like(seed: int = 1, **changes) -> UViT:
    """A U-ViT whose weights are all distinct (as a trained model's are: rows 0 and 1 of pos_embed too)."""
    torch.manual_seed(seed)
    model = build_uvit(**{**SETTINGS, **changes})
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def inputs(n: int = 6, classes: int = 4):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 1, 8, 8, generator=g), torch.rand(n, generator=g) * 999, torch.arange(n) % (classes + 1)


@torch.no_grad()
def test_the_reference_layout_is_ours_with_the_two_extra_tokens_swapped():
    ours = trained_like()
    x, t, y = inputs()
    reference_state = to_reference(ours.state_dict())
    reference = ReferenceOrder(**{k: v for k, v in SETTINGS.items() if k != "size"}, embed_dim=64, depth=4,
                               num_heads=4).eval()
    reference.load_state_dict(reference_state, strict=True)
    assert (reference(x, t, y) - ours(x, t, y)).abs().max() <= 1e-5
    as_named = trained_like(seed=2)  # the reference's tensors loaded name for name: another network
    as_named.load_state_dict(reference_state, strict=True)
    assert (as_named(x, t, y) - ours(x, t, y)).abs().max() > 1e-3
    back = from_reference(reference_state)
    assert back.keys() == ours.state_dict().keys()
    assert all(torch.equal(back[k], v) for k, v in ours.state_dict().items())  # bit-exact round trip
    assert not torch.equal(reference_state["pos_embed"], ours.state_dict()["pos_embed"])


@torch.no_grad()
def test_an_unconditional_model_has_nothing_to_swap():
    state = trained_like(num_classes=0).state_dict()
    assert all(torch.equal(to_reference(state)[k], v) for k, v in state.items())


@torch.no_grad()
def test_load_init_reads_reference_files_wrapped_or_not_and_our_exports(tmp_path):
    ours = trained_like()
    x, t, y = inputs()
    reference = to_reference(ours.state_dict())
    files = {"plain.pth": reference, "ema.pth": {"ema": reference, "step": 5},
             "state_dict.pth": {"state_dict": reference, "optimizer": {"lr": 1.0}},
             "ddp.pth": {f"module.{k}": v for k, v in reference.items()},
             "export.pt": {"kind": "diffusion", "settings": SETTINGS, "step": 3,
                           "weights": ours.state_dict(), "ema": dict(ours.named_parameters())}}
    for name, payload in files.items():
        torch.save(payload, tmp_path / name)
        fresh = trained_like(seed=3)
        state = load_init(tmp_path / name, fresh, SETTINGS)
        assert all(torch.equal(state[k], v) for k, v in ours.state_dict().items()), name
        fresh.load_state_dict(state)
        assert (fresh(x, t, y) - ours(x, t, y)).abs().max() <= 1e-5, name


MISMATCHES = [
    ({"size": "mini"}, "is 128 wide and 6 deep (size mini), the recipe's diffusion.model.size tiny is 64 wide and "
                       "4 deep (patch_embed.proj.weight [128, 1, 2, 2] there, [64, 1, 2, 2] here; in_blocks.0-2 "
                       "there, in_blocks.0-1 here); set diffusion.model.size=mini"),
    ({"num_classes": 10}, "label_emb.weight is [11, 64] there and [5, 64] here: 10 classes there and 4 in the "
                          "training set (rows = classes + 1, the null class of guidance)"),
    ({"num_classes": 0}, "it is unconditional (no label_emb.weight), the recipe's model class-conditional"),
    ({"patch_size": 4}, "its patch size is 4, diffusion.model.patch_size 2 (patch_embed.proj.weight [64, 1, 4, 4] "
                        "there, [64, 1, 2, 2] here); set diffusion.model.patch_size=4"),
    ({"in_chans": 4}, "it takes 4-channel inputs, the training set's are 1-channel (patch_embed.proj.weight "
                      "[64, 4, 2, 2] there, [64, 1, 2, 2] here)"),
    ({"img_size": 16}, "pos_embed is [1, 66, 64] there and [1, 18, 64] here: 16x16 inputs there, 8x8 in the "
                       "training set"),
    ({"conv": False}, "it has no 3x3 conv after unpatchify (final_layer.weight), the recipe's model has; set "
                      "diffusion.model.conv=false"),
    ({"mlp_time_embed": True}, "it has an MLP time embedding (time_embed.0.weight), the recipe's model has not; "
                               "set diffusion.model.mlp_time_embed=true"),
    ({"qkv_bias": True}, "it has qkv biases (in_blocks.0.attn.qkv.bias), the recipe's model has not; set "
                         "diffusion.model.qkv_bias=true"),
]


@pytest.mark.parametrize("changes, message", MISMATCHES, ids=[next(iter(c)) for c, _ in MISMATCHES])
def test_a_checkpoint_of_another_architecture_is_named_in_one_line(tmp_path, changes, message):
    torch.save(to_reference(trained_like(**changes).state_dict()), tmp_path / "other.pth")
    with pytest.raises(UserError) as caught:
        load_init(tmp_path / "other.pth", trained_like(), SETTINGS)
    line = str(caught.value)
    assert "\n" not in line and line.startswith(f"diffusion.init {tmp_path / 'other.pth'} does not fit the recipe's "
                                                "U-ViT: "), line
    assert message in line, line


def test_files_that_are_not_u_vit_state_dicts_are_named(tmp_path):
    state = trained_like().state_dict()
    cases = {
        "missing.pth": (None, "diffusion.init not found"),
        "junk.pth": (b"not a checkpoint", "does not load as a state dict (UnpicklingError)"),
        "list.pth": ([1, 2], "holds no state dict of tensors (a list)"),
        "strings.pth": ({"a": "b", "c": 1}, "holds no state dict of tensors (a dict of 'a', 'c')"),
        "classifier.pt": ({"kind": "classifier", "weights": {}}, "is a classifier model export, not a U-ViT"),
        "vit.pth": ({"cls_token": torch.zeros(1, 1, 8), "blocks.0.attn.qkv.weight": torch.zeros(24, 8)},
                    "69 of its 69 tensors are missing from the file (e.g. decoder_pred.bias, decoder_pred.weight, "
                    "final_layer.bias) and 2 of the file's are unexpected (e.g. blocks.0.attn.qkv.weight, cls_token); "
                    "is it a U-ViT checkpoint?"),
        "short.pth": ({k: v for k, v in state.items() if k != "norm.weight"},
                      "1 of its 69 tensors are missing from the file (e.g. norm.weight) and 0 of the file's are "
                      "unexpected"),
        "reshaped.pth": ({**state, "norm.weight": torch.zeros(3)}, "norm.weight is [3] there and [64] here"),
    }
    for name, (payload, message) in cases.items():
        if isinstance(payload, bytes):
            (tmp_path / name).write_bytes(payload)
        elif payload is not None:
            torch.save(payload, tmp_path / name)
        with pytest.raises(UserError, match=None) as caught:
            load_init(tmp_path / name, trained_like(), SETTINGS)
        assert message in str(caught.value) and "\n" not in str(caught.value), (name, str(caught.value))


def test_zero_steps_need_an_init_file():
    with pytest.raises(RecipeError, match="'diffusion.train.steps' is 0, which trains nothing: set diffusion.init"):
        load_recipe(None, ["diffusion.train.steps=0"])
    assert load_recipe(None, ["diffusion.train.steps=0", "diffusion.init=x.pth"]).diffusion.train.steps == 0
    with pytest.raises(RecipeError, match="'classifier.train.steps' must be at least 1"):
        load_recipe(None, ["classifier.train.steps=0"])


# ---------------------------------------------------------------- stage 2 (real runs, a few seconds each)

def recipe(tmp_path, **train):
    make_shard_set(tmp_path / "data" / "train", [50, 60, 40, 50])
    body = {"name": "init", "out": str(tmp_path / "run"), "seed": 0,
            "data": {"root": str(tmp_path / "data"), "loader": {"workers": 0, "streams": 2}},
            "diffusion": {"model": {"size": "tiny", "patch_size": 2}, "labels": "ground_truth",
                          "init": str(tmp_path / "reference.pth"),
                          "train": {"steps": 2, "micro_batch": 8, "checkpoint_every": 2, "log_every": 1,
                                    "zero_stage": 2, **train}},
            "sample": {"per_class": 2, "steps": 2, "batch": 8}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(body))
    start = trained_like()
    torch.save(to_reference(start.state_dict()), tmp_path / "reference.pth")
    return tmp_path / "r.yaml", start.state_dict()


def export(tmp_path) -> dict:
    return torch.load(tmp_path / "run" / "diffusion" / "weights.pt", weights_only=False)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_stage_2_starts_from_the_init_file(tmp_path, precision):
    """With lr 0 the weights never move: the export is the file's network, exactly, also where the
    module holds bf16 weights (DeepSpeed's fp32 master weights start at the file's values). The EMA
    starts there too; in bf16 it then averages in the module's rounded weights (relative error
    2^-9), which two steps at decay 0.9999 leave well inside 1e-6."""
    path, start = recipe(tmp_path, lr=0.0, precision=precision, ema_decay=0.9999, ema_warmup=False)
    result = run_cli("-q", "train-diffusion", str(path))
    assert result.returncode == 0, result.stderr[-3000:]
    payload = export(tmp_path)
    assert all(torch.equal(payload["weights"][k], v) for k, v in start.items())
    assert all(torch.allclose(payload["ema"][k], start[k], rtol=1e-6, atol=1e-8) for k in payload["ema"])
    assert payload["init"] == str(tmp_path / "reference.pth")


def test_a_resumed_run_takes_its_checkpoint_not_the_init_file(tmp_path):
    path, start = recipe(tmp_path)
    assert run_cli("-q", "train-diffusion", str(path)).returncode == 0
    (tmp_path / "reference.pth").unlink()
    result = run_cli("train-diffusion", str(path), "--set", "diffusion.train.steps=4")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming from a checkpoint: the starting weights given (init) are not read" in result.stderr
    assert export(tmp_path)["step"] == 4
    fresh = run_cli("-q", "train-diffusion", str(path), "--set", f"out={tmp_path / 'fresh'}")
    assert_one_line_error(fresh, f"diffusion.init not found: {tmp_path / 'reference.pth'}")
    assert fresh.returncode == 2


def test_zero_steps_export_the_file_and_sample_runs_from_it(tmp_path):
    path, start = recipe(tmp_path, steps=0)
    result = run_cli("-q", "train-diffusion", str(path))
    assert result.returncode == 0, result.stderr[-3000:]
    payload = export(tmp_path)
    assert payload["step"] == 0 and not (tmp_path / "run" / "diffusion" / "checkpoints").exists()
    assert all(torch.equal(payload["ema"][k], start[k]) and torch.equal(payload["weights"][k], start[k])
               for k in start)
    result = run_cli("-q", "sample", str(path))
    assert result.returncode == 0, result.stderr[-3000:]
    assert Manifest.load(tmp_path / "run" / "samples").num_samples == 8


def test_a_mismatch_is_refused_before_training_in_one_line(tmp_path):
    path, _ = recipe(tmp_path)
    torch.save(to_reference(trained_like(size="mini").state_dict()), tmp_path / "mini.pth")
    for steps in (2, 0):
        result = run_cli("-q", "train-diffusion", str(path), "--set", f"diffusion.init={tmp_path / 'mini.pth'}",
                         "--set", f"diffusion.train.steps={steps}")
        assert_one_line_error(result, "does not fit the recipe's U-ViT: it is 128 wide and 6 deep",
                              "set diffusion.model.size=mini")
        assert result.returncode == 2
    assert not (tmp_path / "run" / "diffusion" / "checkpoints").exists()


def test_run_refuses_a_mismatched_init_file_before_any_stage(tmp_path):
    """`run` checks the file against the recipe's model in its plan: nothing is imported or trained.
    The training set's part (classes, side, channels) waits for stage 2, as the set may not exist yet."""
    path, _ = recipe(tmp_path)
    torch.save(to_reference(trained_like(size="mini").state_dict()), tmp_path / "mini.pth")
    torch.save(to_reference(trained_like(patch_size=4).state_dict()), tmp_path / "patch4.pth")
    torch.save(to_reference(trained_like(num_classes=7).state_dict()), tmp_path / "classes7.pth")
    cases = {"mini.pth": ("it is 128 wide and 6 deep", "set diffusion.model.size=mini"),
             "patch4.pth": ("its patch size is 4, diffusion.model.patch_size 2", "set diffusion.model.patch_size=4"),
             "missing.pth": ("diffusion.init not found",)}
    for name, expected in cases.items():
        result = run_cli("-q", "run", str(path), "--plan", "--set", f"diffusion.init={tmp_path / name}")
        assert_one_line_error(result, *expected)
        assert result.returncode == 2
    assert not (tmp_path / "run").exists()
    plan = run_cli("-q", "run", str(path), "--plan", "--set", f"diffusion.init={tmp_path / 'classes7.pth'}")
    assert plan.returncode == 0, plan.stderr[-3000:]
    stage2 = run_cli("-q", "train-diffusion", str(path), "--set", f"diffusion.init={tmp_path / 'classes7.pth'}")
    assert_one_line_error(stage2, "7 classes there and 4 in the training set")
