"""The shipped recipes: every one loads; its DeepSpeed batch arithmetic holds at the world sizes it is
meant for; the ImageNet U-ViTs and stage-1 backbone have the reference's shapes; the six ImageNet
recipes differ only in labels per class and model size. All on the `meta` device: seconds."""
import dataclasses
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from dpt_scale.diffusion.export import model_settings
from dpt_scale.engine.dsconfig import deepspeed_config
from dpt_scale.models import build_uvit
from dpt_scale.models.classifier import ImageClassifier, load_classifier
from dpt_scale.recipe import load_recipe

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
ALL = sorted(p for p in RECIPES.rglob("*.y*ml"))
IMAGENET = sorted(p for p in (RECIPES / "imagenet256").glob("uvit-*-*label.yaml"))
LABELS = {1: ("imagenet_subsets2/1imgs_class.txt", 0.0025 / 1000),  # list; L2 penalty 0.0025 / labelled images
          2: ("imagenet_subsets1/2imgs_class.txt", 0.0025 / 2000),
          5: ("imagenet_subsets1/5imgs_class.txt", 0.0025 / 5000)}
SIZES = {"l2": ("L", 300_000, 287e6), "h2": ("H", 500_000, 501e6)}


def name(path: Path) -> str:
    return str(path.relative_to(RECIPES))


def world_sizes(path: Path) -> dict[str, list[int]]:
    """Ranks each training section is meant to run on (8 GPUs a node)."""
    if path.name.startswith("mnist"):
        return {"classifier": [1], "diffusion": [1]}  # the CPU demo: one process
    if path.name == "cifar10.yaml":
        return {"classifier": [1, 8], "diffusion": [1, 8]}  # one GPU or one node
    if path.parent.name == "imagenet256":
        return {"classifier": [8], "diffusion": [8, 16, 32]}  # stage 2 on 1, 2 or 4 nodes
    raise AssertionError(f"{name(path)}: say here which world sizes it is for")


def flat(value, prefix="") -> dict:
    if dataclasses.is_dataclass(value):
        value = dataclasses.asdict(value)
    if isinstance(value, dict):
        return {k: v for key, sub in value.items() for k, v in flat(sub, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): value}


def count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_the_expected_recipes_are_there():
    names = {name(p) for p in ALL}
    assert {"mnist-cpu.yaml", "cifar10.yaml", "imagenet256/base.yaml"} <= names
    assert [p.stem for p in IMAGENET] == [f"uvit-{s}-{k}label" for s in ("h2", "l2") for k in (1, 2, 5)]


@pytest.mark.parametrize("path", ALL, ids=name)
def test_every_recipe_loads(path):
    recipe = load_recipe(path)
    assert recipe.name and recipe.out


@pytest.mark.parametrize("path", ALL, ids=name)
def test_deepspeed_batch_arithmetic_at_the_intended_world_sizes(path):
    recipe = load_recipe(path)
    sections = {"classifier": [recipe.classifier.train, recipe.classifier.retrain.train or recipe.classifier.train],
                "diffusion": [recipe.diffusion.train]}
    for section, worlds in world_sizes(path).items():
        for train in sections[section]:
            for world in worlds:
                config = deepspeed_config(train, world)
                micro, accum = config["train_micro_batch_size_per_gpu"], config["gradient_accumulation_steps"]
                assert micro * accum * world == config["train_batch_size"]
                assert config["train_batch_size"] == (train.global_batch or micro * (train.grad_accum or 1) * world)
                assert config["zero_optimization"]["stage"] == train.zero_stage


@pytest.mark.parametrize("path", ALL, ids=name)
def test_stage4_batches_keep_real_labelled_images(path):
    """Stage 4 splits each labelled micro-batch by count (round(micro x fraction) pseudo images): a share
    that rounds to the whole micro-batch would silently drop the real labels."""
    recipe = load_recipe(path)
    micro = (recipe.classifier.retrain.train or recipe.classifier.train).micro_batch
    pseudo = sum(round(micro * f) for f in recipe.classifier.retrain.pseudo_fraction)
    assert micro - pseudo >= 1, (micro, recipe.classifier.retrain.pseudo_fraction)


@pytest.mark.parametrize("path", IMAGENET, ids=name)
def test_imagenet_uvit_has_the_reference_size_on_4x32x32_latents(path):
    recipe = load_recipe(path)
    size, steps, params = SIZES[path.stem.split("-")[1]]
    manifest = SimpleNamespace(meta={"latent": {"shape": [4, 32, 32]}}, num_classes=1000)
    settings = model_settings(recipe, Path("unused"), manifest)
    with torch.device("meta"):
        model = build_uvit(**settings)
    assert (recipe.diffusion.model.size, recipe.diffusion.train.steps, settings["patch_size"]) == (size, steps, 2)
    assert abs(count(model) / params - 1) < 0.01, count(model)
    assert model.num_patches == 256 and settings["grad_checkpointing"]


def test_cifar10_uvit_is_u_vit_s2():
    recipe = load_recipe(RECIPES / "cifar10.yaml")
    manifest = SimpleNamespace(meta={}, num_classes=10, image={"channels": 3}, square_size=lambda *_: 32)
    with torch.device("meta"):
        model = build_uvit(**model_settings(recipe, Path("unused"), manifest))
    assert abs(count(model) / 44e6 - 1) < 0.02, count(model)  # U-ViT-S/2 of U-ViT's CIFAR-10 config


def test_imagenet_recipes_differ_only_in_labels_and_model_size():
    recipes = {p.stem: flat(load_recipe(p)) for p in IMAGENET}
    per_run = {"name", "out"}
    label_keys = {"data.labelled.per_class", "data.labelled.list", "classifier.linear_probe.l2",
                  "classifier.retrain.pseudo_fraction"}
    size_keys = {"diffusion.model.size", "diffusion.model.conv", "diffusion.schedule", "diffusion.label_dropout",
                 "diffusion.train.steps", "diffusion.train.zero_stage"}
    for a in recipes:
        for b in recipes:
            differ = {k for k in recipes[a] if recipes[a][k] != recipes[b][k]}
            same_size, same_labels = a.split("-")[1] == b.split("-")[1], a.split("-")[2] == b.split("-")[2]
            allowed = (per_run if a != b else set()) | (set() if same_labels else label_keys) | \
                (set() if same_size else size_keys)
            assert differ <= allowed, (a, b, differ - allowed)
            if not same_size:
                assert {"diffusion.model.size", "diffusion.train.steps"} <= differ
    for stem, r in recipes.items():
        k = int(stem.split("-")[2].removesuffix("label"))
        assert r["data.labelled.per_class"] == k and r["data.labelled.list"] == f"assets/{LABELS[k][0]}"
        assert r["classifier.linear_probe.l2"] == pytest.approx(LABELS[k][1])
        assert r["classifier.retrain.pseudo_fraction"][0] == pytest.approx(128 / (128 + k), abs=1e-3)
        micro = r["classifier.train.micro_batch"]  # k real images per 128 features, as the reference's mix
        assert (micro, micro - round(micro * r["classifier.retrain.pseudo_fraction"][0])) == (128, k)
        assert r["out"] == f"runs/imagenet256/{stem}" and r["data.root"] == "runs/imagenet256/data"


def test_imagenet_reference_settings():
    r = load_recipe(RECIPES / "imagenet256" / "uvit-h2-1label.yaml")
    d, t = r.diffusion, r.diffusion.train
    assert (t.global_batch, t.lr, t.weight_decay, t.betas, t.warmup_steps, t.lr_schedule) == \
        (1024, 2e-4, 0.03, [0.99, 0.99], 5000, "constant")
    assert (t.ema_decay, t.ema_warmup, t.precision, d.prediction, d.flip, d.latent.autoencoder) == \
        (0.9999, False, "bf16", "epsilon", True, "assets/stable-diffusion/vae")
    assert (r.sample.per_class, r.sample.solver, r.sample.steps, r.sample.guidance) == (128, "dpm_solver++", 50, 1.4)
    assert (r.classifier.method, r.data.source, r.data.image_size) == ("linear_probe", "imagefolder", 256)
    assert r.evaluate.evaluator == "inception" and r.evaluate.inception_weights


def test_imagenet_backbone_is_msn_vit_l7_at_224():
    r = load_recipe(RECIPES / "imagenet256" / "uvit-l2-1label.yaml")
    m = r.classifier.model
    with torch.device("meta"):
        model = ImageClassifier(m.name, 1000, 3, 256, m.mean, m.std, frozen_backbone=True, input_size=m.input_size,
                                crop_pct=m.crop_pct, model_kwargs=m.kwargs)
    net = model.net
    assert model.crop == 224 and net.patch_embed.proj.kernel_size == (7, 7) and net.patch_embed.grid_size == (32, 32)
    assert (net.embed_dim, len(net.blocks), net.blocks[0].attn.num_heads) == (1024, 24, 16)
    assert isinstance(net.norm, torch.nn.Identity) and net.num_features == 1024  # CLS before the final norm
    assert abs(count(net) / 304e6 - 1) < 0.01, count(net)
    # ViT-B/4, the reference's other MSN backbone, is a --set away
    b4 = load_recipe(RECIPES / "imagenet256" / "uvit-l2-1label.yaml", overrides=[
        "classifier.model.name=vit_base_patch16_224", "classifier.model.kwargs.patch_size=4"]).classifier.model
    assert (b4.name, b4.kwargs) == ("vit_base_patch16_224", {"patch_size": 4, "final_norm": False})


def test_crop_and_timm_arguments_reach_the_backbone_and_survive_export(tmp_path):
    """classifier.model.crop_pct and .kwargs: a tiny ViT with patch 7 (no timm name) loads a local weights file,
    sees the centre crop, gives the CLS token before the final norm, and reloads from an export."""
    import timm

    torch.manual_seed(0)
    kwargs = {"patch_size": 7, "final_norm": False}
    source = timm.create_model("test_vit", num_classes=0, img_size=56, patch_size=7)  # with its norm
    weights = tmp_path / "vit_ti7.pth"
    torch.save(source.state_dict(), weights)
    settings = dict(name="test_vit", num_classes=5, in_chans=3, img_size=64, mean=[0.5] * 3,
                    std=[0.25] * 3, frozen_backbone=True, input_size=None, crop_pct=0.875, model_kwargs=kwargs)
    model = ImageClassifier(**settings, pretrained=str(weights)).eval()
    assert model.crop == 56 and model.net.patch_embed.grid_size == (8, 8)
    assert torch.equal(model.net.blocks[-1].mlp.fc2.weight, source.blocks[-1].mlp.fc2.weight)
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    x = (images[..., 4:60, 4:60].float() / 255 - 0.5) / 0.25
    with torch.no_grad():
        tokens = source.blocks(source._pos_embed(source.patch_embed(x)))
        expected = torch.nn.functional.normalize(tokens[:, 0], dim=1)
        assert torch.allclose(model.features(images), expected, atol=1e-5)
        path = tmp_path / "weights.pt"
        torch.save({"kind": "classifier", "settings": settings, "weights": model.state_dict(), "ema": {}}, path)
        assert torch.allclose(load_classifier(path).features(images), expected, atol=1e-5)
