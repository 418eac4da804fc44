"""The tiny VAE stage: trains, caches by config, resumes, loads as the frozen VAE (tiny real runs)."""

from __future__ import annotations

import json
import multiprocessing as mp

import pytest
import torch

from lightning_m2s import vae_stage
from lightning_m2s.errors import ConfigError
from lightning_m2s.models.vae import FrozenVideoVAE
from lightning_m2s.vae_stage import (
    VAE_STAGE_DEFAULTS, ClipSampler, cache_key, ensure_tiny_vae, read_metrics, resolve_stage, stage_dir,
)

# A few cheap steps: 2 on 16 px crops then 2 on 16 or 32 px crops, 2 frames, 2 training scenes; the
# report on one 4-frame 32 px clip per source.
TINY = dict(steps=2, final_steps=2, final_sizes=[16, 32], size=16, batch_size=2, frames=2, num_train_videos=2, eval_clips=1, eval_frames=4,
            eval_size=32, checkpoint_every=2, log_every=2, progress=False, lr=2e-3)


def tiny(tmp_path, **kw) -> dict:
    return {**TINY, "cache_dir": str(tmp_path), **kw}


class Stop(Exception):
    pass


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny stage trained into a fresh cache: (stage, returned path, steps seen by on_step)."""
    stage = tiny(tmp_path_factory.mktemp("vae_cache"))
    seen = []
    path = ensure_tiny_vae(stage, on_step=lambda step, loss: seen.append(step))
    return stage, path, seen


def test_trains_caches_and_loads(trained):
    stage, path, seen = trained
    assert seen == [1, 2, 3, 4]
    assert path == stage_dir(stage) / "model" and (path / "config.json").is_file()
    assert not (path.parent / "checkpoint.pt").exists()  # removed once the model is in place
    m = read_metrics(path)
    assert m["steps"] == 4 and m == read_metrics(path.parent)  # both phases
    for k in ("psnr_heldout_synthetic", "psnr_heldout_real"):
        assert 0 < m[k] < 60
    vae = FrozenVideoVAE.from_pretrained(path, subfolder=None)
    assert vae.scaling_factor == pytest.approx(m["scaling_factor"])  # fitted 1 / latent std was saved
    video = torch.rand(1, 4, 3, 32, 32) * 2 - 1
    z = vae.encode_target(video, sample=False)
    assert z.shape == (1, 4, 4, 32 // vae.downscale, 32 // vae.downscale) and vae.downscale == m["downscale"]
    assert vae.decode(z).shape == video.shape


def test_second_call_uses_the_cache(trained, monkeypatch):
    stage, path, _ = trained
    stamp = (path / "config.json").stat().st_mtime_ns

    def fail(*a, **k):
        raise AssertionError("the cached stage must not train or load data again")

    monkeypatch.setattr(vae_stage, "_run_stage", fail)
    monkeypatch.setattr(vae_stage, "render_train_pool", fail)
    # the same result for the flat form and base.yaml's {enabled, settings} form; log/progress/cache
    # flags are not part of the key
    assert ensure_tiny_vae(stage) == path
    assert ensure_tiny_vae({"enabled": True, "settings": {**stage, "log_every": 7}}) == path
    assert (path / "config.json").stat().st_mtime_ns == stamp


def test_key_depends_on_what_changes_the_result(tmp_path):
    base = tiny(tmp_path)
    k = cache_key(base)
    assert cache_key({**base, "steps": 5}) != k
    assert cache_key({**base, "seed": 1}) != k
    assert cache_key(base, {"latent_channels": 8}) != k
    assert cache_key({**base, "cache_dir": "/elsewhere", "log_every": 1, "checkpoint_every": 3, "progress": True}) == k
    assert stage_dir({**base, "steps": 5}) != stage_dir(base)


def test_unknown_and_bad_keys_raise_config_error(tmp_path):
    with pytest.raises(ConfigError, match="vae_stage.stepz"):
        ensure_tiny_vae({"stepz": 3, "cache_dir": str(tmp_path)})
    with pytest.raises(ConfigError, match="vae_stage.settings.lr_"):
        resolve_stage({"enabled": True, "settings": {"lr_": 1}})
    with pytest.raises(ConfigError, match="multiples of 8"):
        resolve_stage({"size": 20})
    with pytest.raises(ConfigError, match="steps"):
        resolve_stage({"steps": 0})
    with pytest.raises(ConfigError, match="final_sizes"):
        resolve_stage({"final_sizes": 64})
    with pytest.raises(ConfigError, match="multiples of 8"):
        resolve_stage({"final_sizes": [32, 60]})
    with pytest.raises(ConfigError, match="integer"):
        resolve_stage({"frames": 2.5})
    with pytest.raises(ConfigError, match="true or false"):
        resolve_stage({"progress": "yes"})
    with pytest.raises(ConfigError, match="disagree"):
        resolve_stage({"enabled": True, "settings": {"enabled": False}})
    with pytest.raises(ConfigError, match="enabled is false"):
        ensure_tiny_vae({"enabled": False})
    assert set(resolve_stage(None)) == set(VAE_STAGE_DEFAULTS)
    assert not list(tmp_path.iterdir())  # nothing was created


def test_resume_after_interruption_continues_from_the_checkpoint(trained, tmp_path):
    # the fixture's config (2 + 2 steps, a checkpoint every 2) in another cache root (same key), stopped
    # after step 3: the last checkpoint is step 2, so the rerun starts at step 3 (the multi-size phase)
    stage, straight, _ = trained
    stage = {**stage, "cache_dir": str(tmp_path)}
    seen = []

    def stop_at_3(step, loss):
        seen.append(step)
        if step == 3:
            raise Stop

    with pytest.raises(Stop):
        ensure_tiny_vae(stage, on_step=stop_at_3)
    folder = stage_dir(stage)
    assert folder.name == straight.parent.name
    assert (folder / "checkpoint.pt").is_file() and not (folder / "model").exists()
    assert torch.load(folder / "checkpoint.pt", weights_only=False)["step"] == 2
    resumed = []
    path = ensure_tiny_vae(stage, on_step=lambda step, loss: resumed.append(step))
    assert seen == [1, 2, 3] and resumed == [3, 4]
    # the checkpoint restores model, optimiser and every RNG: the same weights as the uninterrupted run
    a = FrozenVideoVAE.from_pretrained(path, subfolder=None).vae.state_dict()
    b = FrozenVideoVAE.from_pretrained(straight, subfolder=None).vae.state_dict()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5, msg=name)
    assert read_metrics(path)["psnr_heldout_synthetic"] == pytest.approx(read_metrics(straight)["psnr_heldout_synthetic"], abs=1e-3)


def test_multi_size_batches_keep_the_pixel_count():
    pool = torch.randint(0, 255, (3, 6, 3, 64, 64), dtype=torch.uint8)
    sampler = ClipSampler(pool, batch_size=4, frames=2, size=16, seed=0)
    assert sampler().shape == (4, 2, 3, 16, 16)
    shapes = {tuple(sampler([16, 32, 64]).shape) for _ in range(30)}
    assert shapes == {(4, 2, 3, 16, 16), (1, 2, 3, 32, 32), (1, 2, 3, 64, 64)}


def test_loss_decreases(tmp_path):
    # 30 steps from a fixed seed: the reconstruction L1 of the last 10 steps is clearly below the first 10
    losses = []
    ensure_tiny_vae(tiny(tmp_path, steps=30, final_steps=0, lr=3e-3, checkpoint_every=100, eval_clips=1),
                    on_step=lambda step, loss: losses.append(loss))
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.8 * first, (first, last)


def _worker(stage, queue, steps_file):
    def record(step, loss):
        with open(steps_file, "a") as f:
            f.write(f"{step}\n")

    queue.put(str(ensure_tiny_vae(stage, on_step=record)))


@pytest.mark.slow
def test_concurrent_processes_share_one_training(tmp_path):
    stage = tiny(tmp_path)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    steps_file = tmp_path / "steps.txt"
    procs = [ctx.Process(target=_worker, args=(stage, queue, str(steps_file))) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(300)
        assert p.exitcode == 0
    paths = {queue.get(timeout=5), queue.get(timeout=5)}
    assert len(paths) == 1
    assert steps_file.read_text().split() == ["1", "2", "3", "4"]  # one process trained, the other waited
    folder = stage_dir(stage)
    assert json.loads((folder / "metrics.json").read_text())["steps"] == TINY["steps"] + TINY["final_steps"]
    assert [p.name for p in folder.iterdir() if p.name.startswith(".")] == []  # no temp leftovers


def test_new_vae_starts_with_identity_time_mix_and_small_posterior_noise():
    vae = vae_stage.new_vae(vae_stage._vae_config(None), seed=0)
    x = torch.randn(1, 3, 5, 4, 4)
    torch.testing.assert_close(vae.decoder.time_conv_out(x), x)
    assert vae.quant_conv.bias[4:].max() < vae_stage.LOGVAR_INIT + 1
