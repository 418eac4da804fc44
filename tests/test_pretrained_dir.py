"""The real img2vid-xt loading path, on a tiny random SVD directory written with save_pretrained."""

import json

import pytest
import torch

from lightning_m2s.errors import ConfigError, ModelError
from lightning_m2s.models.embedding import CLIPFrameEmbedding
from lightning_m2s.models.refiner import build_refiner


@pytest.fixture(scope="module")
def svd_dir(tiny_svd_dir):
    return tiny_svd_dir


def test_loads_widens_and_predicts(svd_dir):
    model = build_refiner(pretrained=str(svd_dir)).eval()
    assert model.unet.conv_in.in_channels == 13
    assert isinstance(model.embedding, CLIPFrameEmbedding)
    left, warped = torch.rand(2, 1, 3, 3, 32, 32).mul(2).sub(1)
    mask = torch.zeros(1, 3, 1, 32, 32, dtype=torch.bool)
    mask[..., 10:16] = True
    cond = model.build_conditioning(left, warped, mask)
    assert cond.context.shape == (1, 3, 64)
    # every left frame gets its own CLIP embedding
    assert not torch.allclose(cond.context[0, 0], cond.context[0, 1])
    with torch.no_grad():
        video = model.decode(model.predict_one_step(cond))
    assert video.shape == left.shape and torch.isfinite(video).all()


def test_saved_widened_unet_reloads(svd_dir, tmp_path):
    model = build_refiner(pretrained=str(svd_dir), left_condition=False)
    assert model.unet.conv_in.in_channels == 9


def test_missing_path_and_not_svd_dir(tmp_path):
    with pytest.raises(ModelError, match="no such directory"):
        build_refiner(pretrained=str(tmp_path / "absent"))
    (tmp_path / "unet").mkdir()
    with pytest.raises(ModelError, match=r"not an SVD checkpoint.*unet/config.json"):
        build_refiner(pretrained=str(tmp_path))
    (tmp_path / "unet" / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    for sub in ("vae", "image_encoder"):
        (tmp_path / sub).mkdir()
        (tmp_path / sub / "config.json").write_text("{}")
    (tmp_path / "feature_extractor").mkdir()
    (tmp_path / "feature_extractor" / "preprocessor_config.json").write_text("{}")
    with pytest.raises(ModelError, match="UNet2DConditionModel"):
        build_refiner(pretrained=str(tmp_path))


def test_config_errors():
    with pytest.raises(ConfigError, match="unknown key"):
        build_refiner(full_atention=True)
    with pytest.raises(ConfigError, match="attention_policy"):
        build_refiner(pretrained=None, attention_policy="nearest")
    with pytest.raises(ConfigError, match="needs model.pretrained"):
        build_refiner(pretrained=None, embedding="clip")
