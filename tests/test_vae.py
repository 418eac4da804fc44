import pytest
import torch

from lightning_m2s.errors import ModelError
from lightning_m2s.models.vae import FrozenVideoVAE, PassThroughAttnProcessor, mid_attentions, switch_off_mid_attention

SMALL = dict(block_out_channels=(32, 32, 32, 32))


@pytest.fixture(scope="module")
def vae():
    return FrozenVideoVAE.from_config(SMALL, seed=0)


def test_frozen_and_shapes(vae):
    assert all(not p.requires_grad for p in vae.parameters())
    vae.train()
    assert not vae.vae.training
    video = torch.rand(2, 3, 3, 32, 16) * 2 - 1
    z = vae.encode_condition(video)
    assert z.shape == (2, 3, vae.latent_channels, 4, 2)
    assert torch.equal(z, vae.encode(video, mode="mean"))
    zt = vae.encode_target(video, generator=torch.Generator().manual_seed(0))
    assert zt.shape == z.shape and not torch.allclose(zt, z * vae.scaling_factor)
    assert torch.allclose(vae.encode_target(video, sample=False), z * vae.scaling_factor)
    assert vae.decode(zt).shape == video.shape
    with pytest.raises(ModelError):
        vae.encode(video, mode="median")


def test_encode_chunking_is_exact(vae):
    video = torch.rand(1, 5, 3, 16, 16) * 2 - 1
    full = vae.encode_condition(video)
    vae.encode_chunk_size = 2
    try:
        assert torch.allclose(vae.encode_condition(video), full, atol=1e-5)
    finally:
        vae.encode_chunk_size = 16


def test_decode_chunks_and_gradients_reach_latents(vae):
    z = torch.randn(1, 4, vae.latent_channels, 2, 2, requires_grad=True)
    out = vae.decode(z)
    out.square().mean().backward()
    assert z.grad is not None and z.grad.abs().sum() > 0
    assert all(p.grad is None for p in vae.parameters())
    # chunks of 2 frames: each chunk decodes as its own clip
    with torch.no_grad():
        chunked = vae.decode(z, decode_chunk_size=2)
        first = vae.decode(z[:, :2])
    assert torch.allclose(chunked[:, :2], first, atol=1e-5)


def test_save_and_load(tmp_path, vae):
    vae.vae.save_pretrained(tmp_path / "tiny_vae")
    loaded = FrozenVideoVAE.from_pretrained(tmp_path / "tiny_vae", subfolder=None)
    video = torch.rand(1, 2, 3, 16, 16) * 2 - 1
    assert torch.allclose(loaded.encode_condition(video), vae.encode_condition(video))
    with pytest.raises(ModelError, match="config.json"):
        FrozenVideoVAE.from_pretrained(tmp_path / "nothing", subfolder=None)


def test_switched_off_mid_attention_is_skipped_with_the_same_output(tmp_path):
    """A VAE trained with its mid-block attention off (zero output projection) saves as a plain diffusers
    VAE; loaded by the project it skips the attention (linear in the frame size) and computes the same."""
    from diffusers import AutoencoderKLTemporalDecoder

    frozen = FrozenVideoVAE.from_config(SMALL, seed=0)
    switch_off_mid_attention(frozen.vae)
    assert all(not p.requires_grad and not p.any() for a in mid_attentions(frozen.vae) for p in a.to_out[0].parameters())
    frozen.vae.save_pretrained(tmp_path / "vae")
    plain = AutoencoderKLTemporalDecoder.from_pretrained(tmp_path / "vae").eval()  # computes the attention
    loaded = FrozenVideoVAE.from_pretrained(tmp_path / "vae", subfolder=None)
    assert all(isinstance(a.processor, PassThroughAttnProcessor) for a in mid_attentions(loaded.vae))
    assert not any(isinstance(a.processor, PassThroughAttnProcessor) for a in mid_attentions(plain))
    video = torch.rand(1, 3, 3, 16, 24) * 2 - 1
    with torch.no_grad():
        z = plain.encode(video[0]).latent_dist.mode()
        assert torch.allclose(loaded.encode_condition(video)[0], z, atol=1e-5)
        assert torch.allclose(loaded.decode(z[None] * loaded.scaling_factor)[0],
                              plain.decode(z, num_frames=3).sample, atol=1e-5)


def test_a_vae_that_uses_its_mid_attention_keeps_it():
    frozen = FrozenVideoVAE.from_config(SMALL, seed=0)  # random: non-zero output projections
    assert not any(isinstance(a.processor, PassThroughAttnProcessor) for a in mid_attentions(frozen.vae))
