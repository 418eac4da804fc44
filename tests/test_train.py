"""Training variants end to end on the debug experiment: tracking, checkpoints, resume, NaN stop, DDP."""

import json
import os
import subprocess
import sys

import mlflow
import numpy as np
import pytest
import torch
from conftest import store_overrides

from lightning_m2s.config import load_config, to_container
from lightning_m2s.data.clip import collate_clips, make_clip
from lightning_m2s.data.datamodule import StereoDataModule
from lightning_m2s.errors import ConfigError, ModelError
from lightning_m2s.modules import load_refiner
from lightning_m2s.modules.base import NonFiniteLossError, replace_frames_with_truth
from lightning_m2s.modules.baselines import background_side_fill
from lightning_m2s.train import build_module, train

FAST = ["trainer.enable_progress_bar=false", "data.val_clips=1", "module.eval.preview_clips=1"]


def _runs(root):
    client = mlflow.MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    exp = client.get_experiment_by_name("m2s")
    return client, client.search_runs([exp.experiment_id])


@pytest.mark.parametrize("variant", ["end_to_end", "latent_only", "standard_diffusion"])
def test_each_variant_trains_evaluates_and_is_tracked(variant, tmp_path):
    overrides = FAST + store_overrides(tmp_path) + [f"module.variant={variant}", "module.eval.steps=2"]
    metrics = train(load_config("debug", overrides))
    for dataset in ("synthetic", "real"):
        for name in ("psnr", "psnr_inside", "psnr_outside", "ms_ssim", "lpips", "lpips_inside", "temporal_error"):
            assert np.isfinite(metrics[f"test/{dataset}/{name}"])
    assert metrics["test/steps"] == 2 and metrics["test/latency_s"] > 0
    client, runs = _runs(tmp_path)
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["module.variant"] == variant and run.data.tags["m2s.variant"] == variant
    assert "train/loss" in run.data.metrics
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "previews", "qualitative"} <= artifacts
    qualitative = {a.path for a in client.list_artifacts(run.info.run_id, "qualitative")}
    assert {"qualitative/synthetic_clip0.npz", "qualitative/real_clip0.npz"} <= qualitative
    checkpoint = tmp_path / "out" / "checkpoints" / "last.ckpt"
    # one last.ckpt (LastCheckpoint's alone, at the run's last step) beside best.ckpt, nothing else
    assert sorted(p.name for p in checkpoint.parent.iterdir()) == ["best.ckpt", "last.ckpt"]
    cfg = load_config("debug", overrides)
    assert torch.load(checkpoint, map_location="cpu", weights_only=True)["global_step"] == cfg.trainer.max_steps
    refiner, eval_cfg = load_refiner(str(checkpoint))  # a checkpoint of any variant gives the model back
    assert eval_cfg["steps"] == 2 and not refiner.training


def test_one_trained_model_is_tested_at_several_step_counts(tmp_path):
    """module.eval.steps=[2, 1]: one training, then every count on the same test clips, each logged by name;
    the plain names (what sweeps' objectives read) are the first count's."""
    overrides = FAST + store_overrides(tmp_path) + ["module.variant=standard_diffusion", "module.eval.steps=[2, 1]"]
    metrics = train(load_config("debug", overrides))
    for dataset in ("synthetic", "real"):
        for n in (1, 2):
            assert np.isfinite(metrics[f"test/{dataset}/steps{n}/lpips"])
        assert metrics[f"test/{dataset}/psnr"] == metrics[f"test/{dataset}/steps2/psnr"]
        assert metrics[f"test/{dataset}/steps1/psnr"] != metrics[f"test/{dataset}/steps2/psnr"]
    assert metrics["test/steps"] == 2 and metrics["test/steps1/latency_s"] > 0 and metrics["test/steps2/latency_s"] > 0
    assert not any("/steps1/" in k for k in metrics if k.startswith("val/"))  # validation: the first count only
    _, runs = _runs(tmp_path)
    assert "test/synthetic/steps1/psnr" in runs[0].data.metrics
    assert runs[0].data.tags["m2s.metrics.lpips_net"] == "alex" and runs[0].data.tags["m2s.metrics.eval_size"] == "32"
    per_clip = json.loads((tmp_path / "out" / "test_per_clip.json").read_text())
    assert [r["psnr"] for r in per_clip["rows"]] == [r["psnr"] for r in per_clip["by_steps"]["2"]]
    assert len(per_clip["by_steps"]["1"]) == len(per_clip["rows"]) == 2
    _, eval_cfg = load_refiner(str(tmp_path / "out" / "checkpoints" / "last.ckpt"))
    assert eval_cfg["steps"] == 2  # inference (m2s convert) uses the first count
    for bad in ("[0]", "[1, 1]", "[]"):
        with pytest.raises(ConfigError, match="module.eval.steps"):
            build_module(load_config("debug", [f"module.eval.steps={bad}"]))


def test_end_to_end_lpips_passes_gradients_through_saturated_pixels():
    """The LPIPS term sees the prediction clamped to [-1, 1], but saturated pixels keep their gradient (a
    straight-through clamp): with every decoded pixel above 1 a hard clamp would leave the UNet none."""
    module = build_module(load_config("debug", ["module.loss.latent_weight=0", "module.loss.l1_weight=0"]))
    batch = collate_clips([StereoDataModule(**to_container(load_config("debug").data)).dataset("test")[0]])
    decode = module.model.decode
    module.model.decode = lambda latent, *args: decode(latent, *args) + 10.0  # every pixel far beyond 1
    loss, parts = module.compute_loss(batch)
    right = batch.right.flatten(0, 1)
    clamped = float(module._lpips(torch.ones_like(right), right).mean())  # what LPIPS of the clamped video is
    assert float(parts["lpips"].detach()) == pytest.approx(clamped, rel=1e-5)
    loss.backward()
    assert module.model.unet.conv_in.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("variant", ["warp_only", "classical_fill"])
def test_baselines_evaluate_without_training(variant, tmp_path):
    metrics = train(load_config("debug", FAST + store_overrides(tmp_path) + [f"module.variant={variant}"]))
    assert np.isfinite(metrics["test/synthetic/psnr"]) and metrics["test/steps"] == 0
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_classical_fill_beats_black_holes_on_real_data(tmp_path):
    # The fill must be closer to the truth inside the mask than leaving holes black (a floor, not a model).
    warp = train(load_config("debug", FAST + store_overrides(tmp_path / "w") + ["module.variant=warp_only"]))
    fill = train(load_config("debug", FAST + store_overrides(tmp_path / "f") + ["module.variant=classical_fill"]))
    assert fill["test/real/psnr_inside"] > warp["test/real/psnr_inside"] + 1.0
    assert fill["test/real/psnr_outside"] == pytest.approx(warp["test/real/psnr_outside"])


def test_background_side_fill_copies_from_the_right():
    warped = torch.tensor([[[[1.0, 2.0, 0.0, 0.0, 5.0, 6.0]]]])  # [1, 1, 1, 6]
    mask = torch.tensor([[[[False, False, True, True, False, False]]]])
    assert background_side_fill(warped, mask).flatten().tolist() == [1, 2, 5, 5, 5, 6]
    edge = torch.tensor([[[[False, False, False, False, True, True]]]])  # nothing on the right: the left neighbour
    assert background_side_fill(warped, edge).flatten().tolist() == [1, 2, 0, 0, 0, 0]


def test_long_video_frames_take_the_ground_truth_and_are_known():
    g = torch.Generator().manual_seed(0)
    left, right = torch.rand(4, 3, 16, 16, generator=g) * 2 - 1, torch.rand(4, 3, 16, 16, generator=g) * 2 - 1
    clip = make_clip(left, right, torch.full((4, 16, 16), 3.0), close_kernel=1)
    batch = type(clip)(**{k: (v[None] if torch.is_tensor(v) else [v]) for k, v in vars(clip).items()})
    known = torch.tensor([[True, True, False, False]])
    out = replace_frames_with_truth(batch, known)
    assert torch.equal(out.warped[0, :2], right[:2]) and torch.equal(out.warped[0, 2:], batch.warped[0, 2:])
    assert not out.mask[0, :2].any() and torch.equal(out.mask[0, 2:], batch.mask[0, 2:])


def test_nan_loss_stops_with_step_and_batch(tmp_path):
    cfg = load_config("debug", FAST + store_overrides(tmp_path) + ["optim.lr=1e30", "trainer.max_steps=6"])
    with pytest.raises(NonFiniteLossError, match=r"global step \d+, batch \d+"):
        train(cfg)
    _, runs = _runs(tmp_path)
    assert runs[0].info.status == "FAILED"


def test_interrupted_run_resumes_from_its_checkpoint_into_the_same_run(tmp_path):
    train(load_config("debug", FAST + store_overrides(tmp_path) + ["trainer.max_steps=2"]))
    train(load_config("debug", FAST + store_overrides(tmp_path) + ["trainer.max_steps=4"]))
    client, runs = _runs(tmp_path)
    assert len(runs) == 1  # the second call continued the first run
    steps = [m.step for m in client.get_metric_history(runs[0].info.run_id, "train/loss")]
    assert max(steps) >= 3 and min(steps) <= 1
    ckpt = torch.load(tmp_path / "out" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 4


@pytest.mark.slow
def test_ddp_with_two_cpu_processes(tmp_path):
    cmd = [sys.executable, "-m", "lightning_m2s.cli", "train", "debug", "trainer.devices=2", "trainer.strategy=ddp",
           "trainer.max_steps=2", *FAST, *store_overrides(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "test/synthetic/psnr" in done.stdout
    _, runs = _runs(tmp_path)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"  # only rank 0 tracks


def test_fine_tuning_starts_from_the_weights_of_another_run(tmp_path):
    first = FAST + store_overrides(tmp_path) + ["trainer.max_steps=2", f"meta.output_dir={tmp_path / 'first'}"]
    train(load_config("debug", first))
    source = tmp_path / "first" / "checkpoints" / "last.ckpt"
    # lr 0: the fine-tune's one step leaves the weights as loaded
    tune = FAST + store_overrides(tmp_path) + ["trainer.max_steps=1", "optim.lr=0", f"checkpoint.init_from={source}",
                                               f"meta.output_dir={tmp_path / 'tune'}", "module.long_video.probability=1"]
    train(load_config("debug", tune))
    a = torch.load(source, map_location="cpu", weights_only=False)
    b = torch.load(tmp_path / "tune" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert b["global_step"] == 1  # a new run, not a resume
    unet = [k for k in a["state_dict"] if k.startswith("model.unet.")]
    assert unet and all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in unet)
    with pytest.raises(ModelError, match="absent.ckpt does not exist"):
        train(load_config("debug", tune + [f"checkpoint.init_from={tmp_path / 'absent.ckpt'}", f"meta.output_dir={tmp_path / 'x'}"]))
    with pytest.raises(ModelError, match="do not fit"):  # 9-channel model from a 13-channel checkpoint
        train(load_config("debug", tune + ["model.left_condition=false", f"meta.output_dir={tmp_path / 'y'}"]))


@pytest.mark.parametrize("positions", ["first", "random"])
def test_long_video_augment_makes_n_frames_known_per_batch(positions):
    from lightning_m2s.modules.latent_only import LatentOnlyModule

    module = LatentOnlyModule(model=dict(pretrained=None, vae=dict(block_out_channels=(32, 32, 32, 32))),
                              long_video=dict(probability=1.0, positions=positions))
    g = torch.Generator().manual_seed(0)
    clips = [make_clip(torch.rand(6, 3, 16, 16, generator=g) * 2 - 1, torch.rand(6, 3, 16, 16, generator=g) * 2 - 1,
                       torch.full((6, 16, 16), 3.0), close_kernel=1) for _ in range(3)]
    batch = collate_clips(clips)
    assert batch.mask.any(dim=(2, 3, 4)).all()  # every frame has holes before
    torch.manual_seed(1)
    counts, starts_first = set(), True
    for _ in range(10):
        out = module._long_video_augment(batch)
        known = ~out.mask.any(dim=(2, 3, 4))  # [B, T]
        assert torch.equal(out.warped[known], batch.right[known])
        counts.add(tuple(known.sum(1).tolist()))
        n = int(known.sum(1)[0])
        starts_first &= bool(known[:, :n].all())
    assert all(len(set(c)) == 1 for c in counts) and len(counts) > 1  # one n per batch, varying
    assert starts_first == (positions == "first")
    with pytest.raises(ConfigError, match="positions"):
        LatentOnlyModule(long_video=dict(positions="last"))
