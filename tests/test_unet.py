import pytest
import torch
from diffusers import UNetSpatioTemporalConditionModel

from lightning_m2s.errors import ModelError
from lightning_m2s.models.unet import TINY_UNET_CONFIG, build_tiny_unet, conditioning_channels, widen_conv_in


@pytest.mark.parametrize("c", [4, 12])  # SVD's latent channels, the embedded default's
@pytest.mark.parametrize("left_condition", [True, False])
def test_widened_conv_equals_svd_conv_at_init(left_condition, c):
    # [x, a, a, m] (3c + 1 channels: 13 for SVD) or [x, a, m] (2c + 1: 9) through the widened conv == SVD's conv on [x, a].
    unet = build_tiny_unet(seed=0, in_channels=2 * c, out_channels=c)
    old = torch.nn.Conv2d(2 * c, unet.conv_in.out_channels, 3, padding=1)
    old.load_state_dict(unet.conv_in.state_dict())
    x, a, m = torch.randn(2, c, 6, 6), torch.randn(2, c, 6, 6), torch.randn(2, 1, 6, 6)
    widen_conv_in(unet, left_condition=left_condition)
    channels = conditioning_channels(c, left_condition)
    assert channels == (3 * c + 1 if left_condition else 2 * c + 1)
    assert unet.conv_in.in_channels == channels == unet.config.in_channels
    inputs = [x, a, a, m] if left_condition else [x, a, m]
    with torch.no_grad():
        assert torch.allclose(unet.conv_in(torch.cat(inputs, 1)), old(torch.cat([x, a], 1)), atol=1e-5)
    assert unet.conv_in.weight[:, channels - 1].abs().max() == 0  # the mask channel starts at zero
    if left_condition:
        assert torch.equal(unet.conv_in.weight[:, c : 2 * c], unet.conv_in.weight[:, 2 * c : 3 * c])


def test_svd_widening_is_exactly_13_channels():
    assert conditioning_channels(4, True) == 13 and conditioning_channels(4, False) == 9


def test_widening_round_trips_through_save_and_load(tmp_path):
    c = TINY_UNET_CONFIG["out_channels"]
    unet = widen_conv_in(build_tiny_unet(seed=0), True)
    unet.save_pretrained(tmp_path / "unet")
    loaded = UNetSpatioTemporalConditionModel.from_pretrained(tmp_path / "unet")
    assert loaded.conv_in.in_channels == 3 * c + 1
    assert torch.equal(loaded.conv_in.weight, unet.conv_in.weight)
    assert widen_conv_in(loaded, True) is loaded  # already widened: unchanged
    with pytest.raises(ModelError, match=f"conv_in has {3 * c + 1}"):
        widen_conv_in(loaded, False)


def test_tiny_unet_runs_and_validates():
    c = TINY_UNET_CONFIG["out_channels"]
    unet = widen_conv_in(build_tiny_unet(seed=0), True)
    out = unet(torch.randn(1, 2, 3 * c + 1, 8, 8), torch.tensor([1.0]), torch.randn(1, 1, 64), torch.tensor([[5.0, 127, 0.02]])).sample
    assert out.shape == (1, 2, c, 8, 8)
    with pytest.raises(ModelError, match="3 x addition_time_embed_dim"):
        build_tiny_unet(addition_time_embed_dim=16)
