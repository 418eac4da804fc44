import pytest
import torch
from diffusers import EulerDiscreteScheduler

from lightning_m2s.objective import Denoiser, edm_scalings, karras_sigmas, loss_weight, sample_sigma


def xt_scheduler():  # img2vid-xt's scheduler config
    return EulerDiscreteScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        prediction_type="v_prediction", interpolation_type="linear", use_karras_sigmas=True, sigma_min=0.002,
        sigma_max=700.0, timestep_spacing="leading", timestep_type="continuous", steps_offset=1, final_sigmas_type="zero",
    )


def model_fn(x_in, t):  # fixed deterministic "network"
    t = torch.as_tensor(t, dtype=x_in.dtype).reshape(-1, *([1] * (x_in.ndim - 1)))
    return torch.tanh(x_in) * 0.7 + 0.1 * t + 0.05 * x_in.roll(1, -1)


def test_scalings_formulas():
    s = torch.tensor([0.002, 1.0, 700.0], dtype=torch.float64)
    c_skip, c_out, c_in, c_noise = edm_scalings(s)
    assert torch.allclose(c_skip, 1 / (s**2 + 1))
    assert torch.allclose(c_out, -s / (s**2 + 1).sqrt())
    assert torch.allclose(c_in, 1 / (s**2 + 1).sqrt())
    assert torch.allclose(c_noise, 0.25 * s.log())
    assert torch.allclose(loss_weight(s), (s**2 + 1) / s**2)


@pytest.mark.parametrize("steps", [1, 5, 25])
def test_euler_matches_diffusers(steps):
    sched = xt_scheduler()
    sched.set_timesteps(steps)
    assert torch.allclose(karras_sigmas(steps), sched.sigmas.float(), rtol=1e-5)
    x0 = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    # diffusers loop from zeros (the paper's mean-noise start)
    x = torch.zeros_like(x0)
    for t in sched.timesteps:
        out = model_fn(sched.scale_model_input(x, t), t)
        x = sched.step(out, t, x).prev_sample
    den = Denoiser(lambda x_in, c_noise, cond: model_fn(x_in, c_noise))
    mine = den.sample(x.shape, None, steps, noise=torch.zeros_like(x))  # the same start as the loop above
    assert torch.allclose(mine, x, atol=1e-4, rtol=1e-4)
    if steps == 1:
        one = den.predict_one_step(x.shape, None)
        assert torch.allclose(one, x, atol=1e-5)
        _, c_out, _, c_noise = edm_scalings(torch.tensor(700.0))
        assert torch.allclose(one, c_out * model_fn(torch.zeros_like(x), c_noise), atol=1e-6)


def test_sample_from_noise_matches_diffusers():
    sched = xt_scheduler()
    sched.set_timesteps(5)
    noise = torch.randn(1, 2, 4, 4, generator=torch.Generator().manual_seed(1))
    x = noise * sched.init_noise_sigma
    for t in sched.timesteps:
        x = sched.step(model_fn(sched.scale_model_input(x, t), t), t, x).prev_sample
    den = Denoiser(lambda x_in, c_noise, cond: model_fn(x_in, c_noise))
    assert torch.allclose(den.sample(x.shape, None, 5, noise=noise), x, rtol=1e-4, atol=1e-3)


def test_sigma_sampling_clamped_lognormal():
    s = sample_sigma(20000, generator=torch.Generator().manual_seed(0))
    assert s.min() >= 0.002 and s.max() <= 700
    assert abs(s.log().median().item() - 1.0) < 0.05
    assert abs(sample_sigma(20000, p_mean=-1.0, p_std=0.5).log().std().item() - 0.5) < 0.02


def test_losses_shapes_and_zero_at_perfect_prediction():
    z = torch.randn(2, 3, 4, 4, 4)
    den = Denoiser(lambda x_in, c_noise, cond: torch.zeros_like(x_in))
    loss = den.diffusion_loss(z, None, torch.tensor([1.0, 5.0]))
    assert loss.shape == (2,) and (loss > 0).all()
    # F = -z * sqrt(s^2+1)/s makes the one-step prediction exactly z
    s = torch.tensor(700.0)
    den = Denoiser(lambda x_in, c_noise, cond: -z * (s**2 + 1).sqrt() / s)
    latent, pred = den.latent_loss(z, None)
    assert latent.shape == (2,) and latent.max() < 1e-10
    with pytest.raises(ValueError):
        Denoiser(lambda *a: None, sigma_min=1.0, sigma_max=0.5)


def test_sampling_starts_from_noise_never_from_zeros():
    """Multi-step sampling without a given noise draws it (seeded): from a zero latent it would only follow
    the mean. Eq. 4's one step from zeros is predict_one_step, not this sampler."""
    den = Denoiser(lambda x_in, c_noise, cond: model_fn(x_in, c_noise))
    shape = (1, 2, 4, 4)
    drawn = den.sample(shape, None, 5, generator=torch.Generator().manual_seed(3))
    given = den.sample(shape, None, 5, noise=torch.randn(shape, generator=torch.Generator().manual_seed(3)))
    assert torch.equal(drawn, given)
    assert not torch.allclose(drawn, den.sample(shape, None, 5, noise=torch.zeros(shape)), atol=1e-3)
    assert not torch.allclose(drawn, den.sample(shape, None, 5, generator=torch.Generator().manual_seed(4)), atol=1e-3)
