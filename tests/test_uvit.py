"""U-ViT: reference sizes, attention backends that agree, conditioning, checkpointing."""
import pytest
import torch

from dpt_scale.errors import UserError
from dpt_scale.models import UVIT_SIZES, build_uvit
from dpt_scale.models.attention import BACKENDS, Attention


def count(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("size, classes, reference", [
    ("S", 0, 44e6),  # the paper's U-ViT-S is unconditional (CIFAR-10 / CelebA)
    ("M", 1000, 131e6), ("L", 1000, 287e6), ("H", 1000, 501e6)])  # ImageNet latent models
def test_parameter_counts_match_the_paper_at_4x32x32_patch_2(size, classes, reference):
    with torch.device("meta"):
        model = build_uvit(size, img_size=32, patch_size=2, in_chans=4, num_classes=classes, conv=False,
                           attention="sdpa")
    assert abs(count(model) / reference - 1) < 0.01, count(model)


def test_sizes_registry():
    sizes = {s: (c["embed_dim"], c["depth"], c["num_heads"]) for s, c in UVIT_SIZES.items()
             if s not in ("tiny", "mini")}
    assert sizes == {"S": (512, 12, 8), "M": (768, 16, 12), "L": (1024, 20, 16), "H": (1152, 28, 16)}
    with pytest.raises(ValueError, match="unknown U-ViT size 'XL'"):
        build_uvit("XL")


def test_sdpa_and_math_attention_agree_forward_and_backward():
    torch.manual_seed(0)
    x = torch.randn(3, 17, 64, requires_grad=True)
    results = {}
    for backend in ("sdpa", "math"):
        attn = Attention(64, 4, backend=backend)
        torch.manual_seed(1)
        for p in attn.parameters():
            torch.nn.init.normal_(p, std=0.2)
        out = attn(x)
        (grad,) = torch.autograd.grad(out.square().sum(), x)
        results[backend] = (out.detach(), grad)
    torch.testing.assert_close(results["sdpa"][0], results["math"][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(results["sdpa"][1], results["math"][1], rtol=1e-4, atol=1e-4)


def test_whole_models_agree_across_backends():
    torch.manual_seed(0)
    models = {}
    for backend in ("sdpa", "math"):
        torch.manual_seed(0)
        models[backend] = build_uvit("tiny", img_size=16, patch_size=2, in_chans=3, num_classes=10, attention=backend)
    x, t, y = torch.randn(2, 3, 16, 16), torch.tensor([10.0, 700.0]), torch.tensor([1, 10])
    torch.testing.assert_close(models["sdpa"](x, t, y), models["math"](x, t, y), rtol=1e-4, atol=1e-5)


def test_xformers_where_it_cannot_run_is_a_clear_error():
    assert set(BACKENDS) == {"math", "sdpa", "xformers"}
    if torch.cuda.is_available():
        pytest.skip("a CUDA machine: covered by the GPU suite")
    with pytest.raises(UserError, match="'xformers' needs CUDA and the xformers package"):
        Attention(64, 4, backend="xformers")
    assert Attention(64, 4, backend="auto").backend == "sdpa"
    with pytest.raises(UserError, match="unknown attention backend 'flash'"):
        Attention(64, 4, backend="flash")


def test_output_shape_conditioning_and_null_class():
    torch.manual_seed(0)
    model = build_uvit("tiny", img_size=16, patch_size=4, in_chans=1, num_classes=10)
    x, t = torch.randn(4, 1, 16, 16), torch.full((4,), 500.0)
    out = model(x, t, torch.tensor([0, 1, 2, model.null_class]))
    assert out.shape == x.shape and model.null_class == 10
    zeros, ones = torch.zeros(4, dtype=torch.long), torch.ones(4, dtype=torch.long)
    assert not torch.allclose(model(x, t, zeros), model(x, t, ones))
    assert not torch.allclose(model(x, t, zeros), model(x, t + 100, zeros))
    with pytest.raises(ValueError, match="needs labels"):
        model(x, t)


def test_gradient_checkpointing_gives_the_same_gradients():
    grads = {}
    for ckpt in (False, True):
        torch.manual_seed(0)
        model = build_uvit("tiny", img_size=16, patch_size=2, in_chans=3, num_classes=5, grad_checkpointing=ckpt)
        torch.manual_seed(1)
        x, t, y = torch.randn(2, 3, 16, 16), torch.tensor([3.0, 900.0]), torch.tensor([0, 4])
        model(x, t, y).square().mean().backward()
        grads[ckpt] = torch.cat([p.grad.flatten() for p in model.parameters()])
    torch.testing.assert_close(grads[False], grads[True])


def test_flops_per_image_counts_the_matmuls():
    model = build_uvit("H", img_size=32, patch_size=2, in_chans=4, num_classes=1000, conv=False, attention="sdpa")
    # The paper gives 133 G multiply-adds for U-ViT-H/2 at 256 px (4x32x32 latents); a multiply-add is 2 FLOPs.
    assert abs(model.flops_per_image() / 2 / 133e9 - 1) < 0.02
