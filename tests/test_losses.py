"""Loss terms: zero for identical inputs, positive otherwise, per sample; x0 matches diffusers' scheduler."""
import numpy as np
import pytest
import torch

from customgen.train.losses import (VGGFeatures, gram_loss, gram_matrix, lpips_loss, noise_l2, offset_noise,
                                    predicted_x0, style_grams)
from customgen.metrics.networks import build_lpips_scorer
from tests.tolerance import gamma, matmul_bound


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(0)
    return torch.rand(3, 3, 64, 64, generator=g) * 2 - 1  # (B, 3, H, W) in [-1, 1]


def test_noise_l2_is_per_sample_mse():
    a, b = torch.zeros(2, 4, 8, 8), torch.ones(2, 4, 8, 8)
    b[1] = 0
    assert torch.equal(noise_l2(a, b), torch.tensor([1.0, 0.0]))


@pytest.mark.parametrize("adaptive", [0.0, 0.5, -3.0])
def test_offset_noise_is_the_published_formula_on_fixed_seeds(adaptive):
    """diffusers' train scripts: noise + offset·N(0, 1) of shape (B, C, 1, 1); kohya's apply_noise_offset with
    adaptive_noise_scale a: offset + a·|mean over H, W of the latents| per sample and channel, clamped at 0 (a = -3
    drives every one to 0 here). Example i's draw comes from its own generator, after its noise: written out here
    from the same seeds, in float64. fp32 rounding: the channel mean of H·W values (γ_{HW}), then a·|m| + offset,
    o·z and the sum, 2 roundings each (Higham 2002, §3.1)."""
    b, c, h, w, offset = 3, 4, 8, 8, 0.1
    latents = torch.randn(b, c, h, w, generator=torch.Generator().manual_seed(99)) * 0.5 + 0.2
    generators = [torch.Generator().manual_seed(10 + i) for i in range(b)]
    noise = torch.stack([torch.randn(c, h, w, generator=g) for g in generators])  # what the loop draws first
    out = offset_noise(noise, latents, generators, offset=offset, adaptive=adaptive).double()
    for i in range(b):
        g = torch.Generator().manual_seed(10 + i)
        n = torch.randn(c, h, w, generator=g).double()
        z = torch.randn(c, 1, 1, generator=g).double()
        mean = latents[i].double().mean(dim=(1, 2), keepdim=True)
        o = torch.clamp(offset + adaptive * mean.abs(), min=0.0)
        expected = n + o * z
        spread = abs(adaptive) * latents[i].double().abs().mean(dim=(1, 2), keepdim=True)
        bound = gamma(2, torch.float32) * (n.abs() + (o + spread) * z.abs()) \
            + gamma(h * w + 2, torch.float32) * spread * z.abs()
        assert ((out[i] - expected).abs() <= bound).all()
    assert torch.equal(out, noise.double()) == (adaptive < 0)  # a = -3: every channel's offset clamped to 0


def test_gram_matrix_matches_numpy_definition(images):
    f = images[:1]
    flat = f.reshape(3, -1).double()
    exact = flat @ flat.T / flat.numel()  # float64 reference
    # fp32: inner products of length H·W, then one division (Higham 2002, eq. 3.13)
    bound = matmul_bound(flat.abs(), flat.abs().T, torch.float32, extra=1) / flat.numel()
    assert ((gram_matrix(f)[0].double() - exact).abs() <= bound).all()


def test_gram_loss_zero_for_the_same_image_positive_otherwise(images):
    vgg = VGGFeatures(pretrained=False)
    target = style_grams(vgg, images[:1])
    loss = gram_loss(vgg(images), target)
    assert loss.shape == (3,) and (loss[1:] > 0).all()
    # The same image through the same call: exactly zero (a batch of 3 may round differently from one image)
    assert gram_loss(vgg(images[:1]), target).tolist() == [0.0]


def test_lpips_zero_for_identical_positive_otherwise_and_differentiable(images):
    net = build_lpips_scorer(net="vgg", smoke=True, device="cpu").model
    x = images.clone().requires_grad_(True)
    same = lpips_loss(net, images, images)
    assert same.shape == (3,) and same.tolist() == [0.0] * 3  # both branches run the same call on the same input
    other = lpips_loss(net, x, images.flip(0))
    assert (other[[0, 2]] > 0).all()
    other.sum().backward()
    assert x.grad.abs().sum() > 0


def test_predicted_x0_equals_the_schedulers_own():
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False)
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g)
    t = torch.tensor([500])
    noisy = sched.add_noise(x0, eps, t)
    ref = sched.step(eps, 500, noisy).pred_original_sample
    ours = predicted_x0(noisy, eps, sched.alphas_cumprod, t).double()
    # (x_t − √(1−ᾱ)·ε)/√ᾱ takes ≤ 6 roundings in fp32 per implementation; add_noise's √ᾱ·x0 + √(1−ᾱ)·ε ≤ 4 more,
    # each relative to size ≥ |x0|, √((1−ᾱ)/ᾱ)·|ε| (Higham 2002, §3.1, Lemma 3.3)
    a = sched.alphas_cumprod[t].double()
    size = (noisy.double().abs() + (1 - a).sqrt() * eps.double().abs()) / a.sqrt()
    assert ((ours - ref.double()).abs() <= gamma(12, torch.float32) * size).all()
    assert ((ours - x0.double()).abs() <= gamma(14, torch.float32) * size).all()


@pytest.mark.parametrize("prediction_type,extra", [("epsilon", 0.0), ("v_prediction", 1.0)])
def test_min_snr_weights_follow_the_prediction_type(prediction_type, extra):
    """Min-SNR-γ (Hang et al. 2023): min(SNR, γ)/SNR for ε, min(SNR, γ)/(SNR + 1) for v (diffusers' examples)."""
    from types import SimpleNamespace

    from diffusers import DDPMScheduler

    from customgen.train.loop import _weighted_l2

    sched = DDPMScheduler(num_train_timesteps=1000, prediction_type=prediction_type)
    run = SimpleNamespace(cfg=SimpleNamespace(loss=SimpleNamespace(snr_gamma=5.0)),
                          comps=SimpleNamespace(noise_scheduler=sched))
    t = torch.tensor([10, 300, 900])
    pred, target = torch.zeros(3, 4, 2, 2), torch.ones(3, 4, 2, 2)
    a = sched.alphas_cumprod.double().numpy()[t.numpy()]
    snr = a / (1 - a)  # independent of diffusers' compute_snr
    want = np.minimum(snr, 5.0) / (snr + extra)
    # fp32 roundings: SNR = (√ᾱ/√(1−ᾱ))² ≤ 9 (the square doubles the roots'), SNR + 1 one more, the ratio and the
    # product one each; numerator and denominator together ≤ 21 (Higham 2002, §3.1, Lemma 3.3)
    assert np.allclose(_weighted_l2(run, pred, target, t).double().numpy(), want, rtol=gamma(21, torch.float32), atol=0)
