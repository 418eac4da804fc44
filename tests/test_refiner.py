import pytest
import torch

from lightning_m2s.errors import ConfigError
from lightning_m2s.models.refiner import build_refiner
from lightning_m2s.objective import edm_scalings

VAE = dict(block_out_channels=(32, 32, 32, 32), latent_channels=4)  # SVD's layout: 8x down, 4 channels


def batch(B=1, T=3, S=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    left, warped, right = (torch.rand(B, T, 3, S, S, generator=g) * 2 - 1 for _ in range(3))
    mask = torch.zeros(B, T, 1, S, S, dtype=torch.bool)
    mask[..., 8:16] = True
    return left, warped, right, mask


@pytest.fixture(scope="module")
def model():
    return build_refiner(pretrained=None, vae=VAE)


def test_conditioning_layout(model):
    left, warped, _, mask = batch()
    model.eval()
    cond = model.build_conditioning(left, warped, mask, cond_aug=0.0)
    assert cond.latents.shape == (1, 3, 9, 4, 4)
    assert torch.allclose(cond.latents[:, :, 0:4], model.vae.encode_condition(left), atol=1e-5)
    assert torch.allclose(cond.latents[:, :, 4:8], model.vae.encode_condition(warped), atol=1e-5)
    m = cond.latents[:, :, 8]
    assert m.min() == -1 and m.max() == 1  # +1 hole / -1 known
    assert cond.context.shape == (1, 3, 64)
    assert cond.added_time_ids.tolist() == [[5.0, 127.0, 0.0]]
    assert model.build_conditioning(left, warped, mask).added_time_ids[0, 2].item() == pytest.approx(0.02)
    model.train()
    aug = model.build_conditioning(left, warped, mask).added_time_ids[:, 2]
    assert aug.item() != pytest.approx(0.02)


def test_one_step_is_c_out_times_v_and_sample_one_step_equal(model):
    left, warped, _, mask = batch()
    model.eval()
    cond = model.build_conditioning(left, warped, mask)
    with torch.no_grad():
        one = model.predict_one_step(cond)
        _, c_out, _, c_noise = edm_scalings(torch.tensor([700.0]))
        v = model._network(torch.zeros(cond.latent_shape), c_noise.float(), cond)
        assert torch.allclose(one, c_out.float() * v, atol=1e-6)
        assert torch.allclose(model.sample(cond, 1, noise=torch.zeros(cond.latent_shape)), one, atol=1e-6)
        assert model.sample(cond, 5).shape == one.shape


def test_end_to_end_gradients_reach_only_the_unet(model):
    left, warped, right, mask = batch()
    model.train()
    cond = model.build_conditioning(left, warped, mask)
    target = model.encode_target(right)
    latent_loss, pred = model.denoiser.latent_loss(target, cond)
    (latent_loss.mean() + (model.decode(pred) - right).abs().mean()).backward()
    assert model.unet.conv_in.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.vae.parameters())
    assert {id(p) for p in model.trainable_parameters()} == {id(p) for p in model.unet.parameters()}
    model.unet.zero_grad(set_to_none=True)


def test_left_condition_off_and_full_attention_off():
    left, warped, _, mask = batch()
    model = build_refiner(pretrained=None, vae=VAE, left_condition=False, full_attention=False).eval()
    cond = model.build_conditioning(left, warped, mask)
    assert cond.latents.shape[2] == 5 and model.unet.conv_in.in_channels == 9
    assert model.attention is None and cond.hole_mask is None
    assert model.predict(left, warped, mask).shape == left.shape
    # several steps start from seeded noise, never from a zero latent
    with torch.no_grad():
        five = model.predict(left, warped, mask, steps=5, seed=0)
        assert torch.equal(five, model.predict(left, warped, mask, steps=5, seed=0))
        assert not torch.allclose(five, model.predict(left, warped, mask, steps=5, seed=1))
        cond = model.build_conditioning(left, warped, mask, cond_aug=model.cond_aug_eval)
        from_zeros = model.decode(model.sample(cond, 5, noise=torch.zeros(cond.latent_shape)))
        assert not torch.allclose(five, from_zeros)


def test_full_attention_changes_output_only_inside_clip_context():
    left, warped, _, mask = batch(T=2)
    on = build_refiner(pretrained=None, vae=VAE, seed=1).eval()
    off = build_refiner(pretrained=None, vae=VAE, seed=1, full_attention=False).eval()
    with torch.no_grad():
        c = on.build_conditioning(left, warped, mask, cond_aug=0.0)
        a, b = on.predict_one_step(c), off.predict_one_step(c)
        assert (a - b).abs().max() > 1e-5
        no_hole = on.build_conditioning(left, warped, torch.zeros_like(mask), cond_aug=0.0)
        assert torch.allclose(on.predict_one_step(no_hole), off.predict_one_step(no_hole), atol=1e-6)


def test_gradient_checkpointing_option():
    model = build_refiner(pretrained=None, vae=VAE, gradient_checkpointing=True).train()
    assert model.unet.is_gradient_checkpointing
    left, warped, right, mask = batch()
    cond = model.build_conditioning(left, warped, mask)
    model.predict_one_step(cond).square().mean().backward()
    assert model.unet.conv_in.weight.grad is not None


@pytest.mark.slow  # two builds of the shipped model and a backward each
def test_bf16_autocast_keeps_the_prediction_and_gradient_of_fp32():
    """model.autocast_dtype=bfloat16 runs the encodes, the UNet and the decode in bf16 (an option for CPUs
    and GPUs with native bf16). On the shipped weights, same batch: its prediction and the UNet's gradient
    stay within 2% of fp32's (measured 0.9% and 0.9%), and what leaves the model is fp32."""
    left, warped, right, mask = batch(S=64)
    results = []
    for dtype in (None, "bfloat16"):
        model = build_refiner(pretrained="embedded", full_attention=False, autocast_dtype=dtype).eval()
        cond = model.build_conditioning(left, warped, mask, cond_aug=0.0)
        video = model.decode(model.predict_one_step(cond))
        (video - right).abs().mean().backward()
        results.append((video.detach(), model.unet.conv_in.weight.grad))
    (video32, grad32), (video16, grad16) = results
    assert video16.dtype == torch.float32
    assert 0 < (video16 - video32).norm() < 0.02 * video32.norm()  # > 0: bf16 did run
    assert (grad16 - grad32).norm() < 0.02 * grad32.norm()


def test_model_sees_the_dilated_mask():
    left, warped, _, mask = batch()
    mask = torch.zeros_like(mask)
    mask[..., 12:14, 12:14] = True  # a 2x2 hole
    plain = build_refiner(pretrained=None, vae=VAE, mask_dilation=1).eval()
    dilated = build_refiner(pretrained=None, vae=VAE, mask_dilation=3).eval()
    a = plain.build_conditioning(left, warped, mask, cond_aug=0.0)
    b = dilated.build_conditioning(left, warped, mask, cond_aug=0.0)
    assert a.hole_mask.sum() == 3 * 4 and b.hole_mask.sum() == 3 * 16  # 2x2 -> 4x4 per frame
    assert (b.latents[:, :, 8] > a.latents[:, :, 8]).any()
    assert torch.equal(a.latents[:, :, :8], b.latents[:, :, :8])
    with pytest.raises(ConfigError, match="mask_dilation"):
        build_refiner(pretrained=None, vae=VAE, mask_dilation=2)
    with pytest.raises(ConfigError, match="model.attention_kv"):
        build_refiner(pretrained=None, vae=VAE, attention_kv="raw")


@pytest.mark.parametrize("steps", [1, 3])
def test_evaluation_and_convert_give_the_same_output_for_a_clip_seed_and_steps(steps):
    """One noise source (StereoRefiner.generate): the evaluation of a module and `m2s convert`'s refinement
    draw the same condition augmentation and the same starting noise for the same clip, seed and steps."""
    from types import SimpleNamespace

    from lightning_m2s.config import load_config
    from lightning_m2s.convert import refine_latent
    from lightning_m2s.train import build_module

    module = build_module(load_config("debug", [])).eval()
    left, warped, _, mask = batch(T=3, S=32, seed=3)
    clip = SimpleNamespace(left=left, warped=warped, mask=mask, meta=[{"fps": 5.0}])
    with torch.no_grad():
        evaluated = module.predict_video(clip, seed=7, steps=steps)[0]
        latent = refine_latent(module.model, left[0], warped[0], mask[0, :, 0], steps=steps, fps_id=5.0, seed=7)
        converted = module.model.decode(latent)[0].clamp(-1, 1)
        other_seed = module.predict_video(clip, seed=8, steps=steps)[0]
    assert torch.allclose(evaluated, converted, atol=1e-5)
    if steps > 1:
        assert not torch.allclose(evaluated, other_seed, atol=1e-3)
