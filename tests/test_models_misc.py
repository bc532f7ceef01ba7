"""timm classifiers and the diffusion core: schedules, loss, autoencoder, sampler."""
import pytest
import torch

from dpt_scale.diffusion.loss import denoising_loss
from dpt_scale.diffusion.sampling import sample
from dpt_scale.diffusion.schedules import SCHEDULES, build_schedule
from dpt_scale.errors import UserError
from dpt_scale.models import build_classifier, build_uvit


def test_any_timm_classifier_with_channels_classes_and_size():
    cnn = build_classifier("resnet18", num_classes=10, in_chans=1, img_size=28)  # img_size ignored by convnets
    assert cnn(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    vit = build_classifier("vit_tiny_patch16_224", num_classes=4, in_chans=3, img_size=32, patch_size=4)
    assert vit(torch.randn(2, 3, 32, 32)).shape == (2, 4)
    with pytest.raises(UserError, match="unknown timm model 'resnet181'; did you mean resnet18"):
        build_classifier("resnet181", num_classes=10)


def test_pretrained_weights_from_a_local_file_only(tmp_path):
    import timm

    source = timm.create_model("resnet18", num_classes=1000)
    torch.save(source.state_dict(), tmp_path / "r18.pth")
    model = build_classifier("resnet18", num_classes=10, in_chans=1, pretrained=str(tmp_path / "r18.pth"),
                             frozen_backbone=True)
    assert torch.equal(model.layer2[0].conv1.weight, source.layer2[0].conv1.weight)
    assert torch.allclose(model.conv1.weight[:, 0], source.conv1.weight.sum(1))  # RGB filters summed to gray
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"fc.weight", "fc.bias"}
    with pytest.raises(UserError, match=f"pretrained weights not found: {tmp_path / 'missing.pth'}"):
        build_classifier("resnet18", num_classes=10, pretrained=str(tmp_path / "missing.pth"))


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_schedules_preserve_variance_and_run_from_clean_to_noise(name):
    schedule = build_schedule(name)
    t = schedule.sample_t(10_000)
    alpha, sigma = schedule.alpha_sigma(t)
    torch.testing.assert_close(alpha ** 2 + sigma ** 2, torch.ones_like(alpha))
    ends = torch.tensor([0, schedule.num_timesteps - 1]) if name == "sd_discrete" else torch.tensor([1e-3, 1.0])
    first, last = schedule.alpha_sigma(ends)[0]
    assert first > 0.99 and last < 0.07
    assert len(schedule.betas) == 1000 and schedule.betas.min() > 0 and schedule.betas.max() < 0.03


def test_sd_betas_and_the_linear_vp_discretisation():
    sd = build_schedule("sd_discrete")
    assert sd.betas[0].item() == pytest.approx(0.00085) and sd.betas[-1].item() == pytest.approx(0.012)
    vp = build_schedule("linear_vp")  # samplers see the continuous schedule exactly at t = (i + 1) / 1000
    chain = torch.cumprod(1 - vp.betas, 0).sqrt()
    index = torch.tensor([0, 99, 499, 899, 999])
    torch.testing.assert_close(vp.alpha_sigma((index + 1) / 1000)[0].double(), chain[index], rtol=1e-6, atol=0)


def test_label_dropout_sends_labels_to_the_null_class():
    seen = []

    def model(x, t, y):
        seen.append(y.clone())
        return torch.zeros_like(x)
    schedule = build_schedule("linear_vp")
    y = torch.zeros(4000, dtype=torch.long)
    loss = denoising_loss(model, torch.zeros(4000, 1, 2, 2), y, schedule, label_dropout=0.25, null_class=7)
    assert loss.item() == pytest.approx(1.0, rel=0.05)  # predicting zero noise costs E[noise^2] = 1
    dropped = (seen[0] == 7).float().mean().item()
    assert 0.22 < dropped < 0.28 and set(seen[0].tolist()) == {0, 7}


def test_tiny_autoencoder_from_a_local_folder(tmp_path):
    from diffusers import AutoencoderKL

    from dpt_scale.diffusion.autoencoder import LatentAutoencoder

    AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
                  layers_per_block=1, norm_num_groups=4, sample_size=16).save_pretrained(tmp_path / "vae")
    ae = LatentAutoencoder(tmp_path / "vae", scale_factor=0.5)
    mean, logvar = ae.moments(torch.rand(2, 3, 16, 16) * 2 - 1)
    assert mean.shape == logvar.shape == (2, 4, 8, 8)
    z1, z2 = ae.sample(mean, logvar), ae.sample(mean, logvar)
    assert z1.shape == mean.shape and not torch.equal(z1, z2)  # a fresh draw from the stored moments
    assert ae.decode(z1).shape == (2, 3, 16, 16)
    with pytest.raises(UserError, match="autoencoder not found: .*nothing is downloaded"):
        LatentAutoencoder(tmp_path / "nope")


def test_sampler_guidance_and_determinism():
    torch.manual_seed(0)
    model = build_uvit("tiny", img_size=8, patch_size=2, in_chans=1, num_classes=3, attention="sdpa").eval()
    schedule = build_schedule("linear_vp")
    labels = torch.tensor([0, 1, 2])
    noise = torch.randn(3, 1, 8, 8)
    plain = sample(model, schedule, labels, (1, 8, 8), steps=10, null_class=3, noise=noise)
    assert plain.shape == (3, 1, 8, 8) and torch.isfinite(plain).all()
    assert torch.equal(plain, sample(model, schedule, labels, (1, 8, 8), steps=10, null_class=3, noise=noise))
    guided = sample(model, schedule, labels, (1, 8, 8), steps=10, guidance=1.4, null_class=3, noise=noise)
    assert not torch.allclose(guided, plain)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_the_sampler_recovers_the_data_under_an_exact_noise_oracle(name, prediction):
    """For data that is always the same image c, the exact noise prediction is (x_t - alpha c) / sigma
    (and v = alpha eps - sigma c); DPM-Solver++ and ancestral sampling with it must land on c: this
    pins down schedule, time mapping, target and update rule."""
    schedule = build_schedule(name)
    c = torch.linspace(-0.8, 0.8, 16).view(1, 1, 4, 4)

    class Oracle(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.unused = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x, model_time, y):
            t = model_time / 1000 if name == "linear_vp" else model_time.long()
            alpha, sigma = (v.view(-1, 1, 1, 1) for v in schedule.alpha_sigma(t))
            eps = (x - alpha * c) / sigma
            return eps if prediction == "epsilon" else alpha * eps - sigma * c

    for solver, steps in (("dpm_solver++", 10), ("dpm_solver++", 25), ("ddpm", 50)):
        x = sample(Oracle(), schedule, torch.zeros(3, dtype=torch.long), (1, 4, 4), steps=steps, null_class=1,
                   solver=solver, prediction=prediction)
        torch.testing.assert_close(x, c.expand_as(x), rtol=0, atol=1e-5)
