import pytest
import torch
from diffusers import UNetSpatioTemporalConditionModel

from lightning_m2s.errors import ModelError
from lightning_m2s.models.unet import build_tiny_unet, conditioning_channels, widen_conv_in


@pytest.mark.parametrize("left_condition", [True, False])
def test_widened_conv_equals_svd_conv_at_init(left_condition):
    # [x, a, a, m] (13 channels) or [x, a, m] (9) through the widened conv == SVD's conv on [x, a].
    unet = build_tiny_unet(seed=0)
    old = torch.nn.Conv2d(8, unet.conv_in.out_channels, 3, padding=1)
    old.load_state_dict(unet.conv_in.state_dict())
    x, a, m = torch.randn(2, 4, 6, 6), torch.randn(2, 4, 6, 6), torch.randn(2, 1, 6, 6)
    widen_conv_in(unet, left_condition=left_condition)
    channels = conditioning_channels(left_condition)
    assert unet.conv_in.in_channels == channels == unet.config.in_channels
    inputs = [x, a, a, m] if left_condition else [x, a, m]
    with torch.no_grad():
        assert torch.allclose(unet.conv_in(torch.cat(inputs, 1)), old(torch.cat([x, a], 1)), atol=1e-5)
    assert unet.conv_in.weight[:, channels - 1].abs().max() == 0  # the mask channel starts at zero
    if left_condition:
        assert torch.equal(unet.conv_in.weight[:, 4:8], unet.conv_in.weight[:, 8:12])


def test_widening_round_trips_through_save_and_load(tmp_path):
    unet = widen_conv_in(build_tiny_unet(seed=0), True)
    unet.save_pretrained(tmp_path / "unet")
    loaded = UNetSpatioTemporalConditionModel.from_pretrained(tmp_path / "unet")
    assert loaded.conv_in.in_channels == 13
    assert torch.equal(loaded.conv_in.weight, unet.conv_in.weight)
    assert widen_conv_in(loaded, True) is loaded  # already widened: unchanged
    with pytest.raises(ModelError, match="conv_in has 13"):
        widen_conv_in(loaded, False)


def test_tiny_unet_runs_and_validates():
    unet = widen_conv_in(build_tiny_unet(seed=0), True)
    out = unet(torch.randn(1, 2, 13, 8, 8), torch.tensor([1.0]), torch.randn(1, 1, 64), torch.tensor([[5.0, 127, 0.02]])).sample
    assert out.shape == (1, 2, 4, 8, 8)
    with pytest.raises(ModelError, match="3 x addition_time_embed_dim"):
        build_tiny_unet(addition_time_embed_dim=16)
