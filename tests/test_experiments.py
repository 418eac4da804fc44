"""Every experiment file loads, and each runs one training step (the paper-scale one on stand-ins)."""

import mlflow
import pytest
import torch
from conftest import store_overrides, write_stereo4d_clip

from lightning_m2s.config import EXPERIMENTS_DIR, load_config, to_container
from lightning_m2s.errors import ConfigError, ModelError
from lightning_m2s.models.refiner import build_refiner
from lightning_m2s.modules import load_refiner
from lightning_m2s.train import output_dir, train

EXPERIMENTS = sorted(p.stem for p in EXPERIMENTS_DIR.glob("*.yaml"))

# One step at the smallest sizes: the experiment's model and objective, not its schedule, are under test.
SMOKE = [
    "trainer.max_steps=1", "trainer.enable_progress_bar=false", "trainer.log_every_n_steps=1",
    "data.buckets=[{frames: 4, size: 32}]", "data.batch_size=1", "data.train_batches=1", "data.num_workers=0",
    "data.eval_frames=4", "data.eval_size=32", "data.val_clips=1", "data.test_clips=3",
    "module.eval.preview_clips=1",
    "module.eval.ms_ssim=per_frame",  # svd_xt's released MS-SSIM needs frames > 160 px
]


def test_the_main_experiments_exist():
    assert {"base", "tiny", "debug", "svd_xt"} <= set(EXPERIMENTS)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_loads_with_every_key_known(name):
    cfg = load_config(name)
    assert cfg.meta.experiment == name
    assert set(cfg) == set(load_config("base"))


def test_unknown_key_in_a_file_names_file_and_key(tmp_path):
    bad = tmp_path / "typo.yaml"
    bad.write_text(f"base_config: {EXPERIMENTS_DIR / 'tiny.yaml'}\nmodel:\n  left_conditon: false\n")
    with pytest.raises(ConfigError, match=r"typo\.yaml.*model\.left_conditon"):
        load_config(bad)
    with pytest.raises(ConfigError, match="optim.lrr"):
        load_config("tiny", ["optim.lrr=1"])
    with pytest.raises(ConfigError, match="no experiment named"):
        load_config("tiny_typo")


def test_every_default_is_written_once_in_base_yaml():
    """The classes built from a config section take base.yaml's defaults; their signatures hold none."""
    import inspect

    import lightning as L

    from lightning_m2s.data import StereoDataModule
    from lightning_m2s.models.refiner import StereoRefiner

    for cls in (StereoRefiner, StereoDataModule):
        written = [p.name for p in inspect.signature(cls).parameters.values() if p.default is not p.empty]
        assert written == [], f"{cls.__name__} writes defaults of its own: {written}"
    base = load_config("base")
    assert StereoDataModule().num_workers == base.data.num_workers
    assert build_refiner(pretrained=None).cond_aug_eval == base.model.cond_aug_eval
    assert set(base.trainer) <= set(inspect.signature(L.Trainer).parameters)  # Lightning's keys only


def test_keys_moved_out_of_trainer_still_work_with_a_warning(tmp_path, caplog):
    old = tmp_path / "old.yaml"
    old.write_text(f"base_config: {EXPERIMENTS_DIR / 'debug.yaml'}\ntrainer:\n  checkpoint_every_n_steps: 7\n")
    cfg = load_config(old, ["trainer.init_from=/some/best.ckpt"])
    assert (cfg.checkpoint.every_n_steps, cfg.checkpoint.init_from) == (7, "/some/best.ckpt")
    assert "init_from" not in cfg.trainer
    assert "trainer.init_from is now checkpoint.init_from" in caplog.text
    assert "trainer.checkpoint_every_n_steps is now checkpoint.every_n_steps" in caplog.text


@pytest.mark.parametrize("name", [n for n in EXPERIMENTS if n != "svd_xt"])
def test_one_step_of_each_experiment(name, tmp_path):
    metrics = train(load_config(name, SMOKE + store_overrides(tmp_path)))
    assert any(k.startswith("test/synthetic/") for k in metrics)
    assert all(v == v for v in metrics.values())  # no NaN


def test_paper_scale_experiment_is_set_up_as_released():
    cfg = load_config("svd_xt")
    assert cfg.module.eval.lpips_net == "vgg" and cfg.module.eval.ms_ssim == "released"
    assert cfg.model.attention_policy == "bilinear" and cfg.data.splat == "released"
    stereo4d = next(s for s in cfg.data.test_sources if s.name == "stereo4d")
    assert stereo4d.warps == "released" and stereo4d.videos == "test.json"
    # Validation every 5k optimiser steps, as the release: an epoch is train_batches per GPU over the accumulation.
    every = cfg.data.train_batches // cfg.trainer.accumulate_grad_batches * cfg.trainer.check_val_every_n_epoch
    assert every == 5000
    line = next(t for t in (EXPERIMENTS_DIR / "svd_xt.yaml").read_text().splitlines() if "check_val_every_n_epoch" in t)
    assert "every 5k" in line  # the comment says what the settings do


def released_test_entry(root) -> str:
    """svd_xt's own Stereo4D test entry (the release's warps and split file) with a stand-in root, as YAML."""
    entry = {**to_container(load_config("svd_xt").data.test_sources[0]), "root": str(root)}
    assert entry["warps"] == "released" and entry["videos"] == "test.json"
    return "{" + ", ".join(f"{k}: {v}" for k, v in entry.items()) + "}"


def test_paper_scale_experiment_runs_one_step_on_stand_ins(tmp_path, tiny_svd_dir, stereo_arrays):
    """svd_xt on stand-ins in the real layouts: training clips warped by the release's splat from flows
    with outliers (counted per epoch), the test set the release's own offline warps and its split file."""
    from lightning_m2s.data.video_io import write_video
    from lightning_m2s.geometry import released_splat

    left, right, disparity = stereo_arrays
    with_outliers = disparity.copy()
    with_outliers[:, 10:14, 20:30] = -5.0  # 40 pixels per frame: holes of the warp, not an error
    write_stereo4d_clip(tmp_path / "train", "trainclip", left, right, with_outliers)
    write_stereo4d_clip(tmp_path / "val", "valclip", left, right, disparity)
    test = tmp_path / "test"  # the release's layout: views, offline warps, test.json
    write_stereo4d_clip(test, "testclip", left, right, disparity, nested=False)
    warped, holes = released_splat(torch.from_numpy(left).permute(0, 3, 1, 2).float(), torch.from_numpy(disparity))
    write_video(test / "reprojected" / "testclip.mp4", warped.round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy(),
                30.0, lossless=True)
    write_video(test / "reprojected_mask" / "testclip.mp4",
                (holes[..., None] * 255).byte().expand(-1, -1, -1, 3).numpy(), 30.0, lossless=True)
    (test / "test.json").write_text('["testclip"]')
    stand_ins = [
        f"model.pretrained={tiny_svd_dir}", f"data.train_sources=[{{name: stereo4d, root: {tmp_path / 'train'}}}]",
        f"data.val_sources=[{{name: stereo4d, root: {tmp_path / 'val'}}}]",
        f"data.test_sources=[{released_test_entry(test)}]",
        "trainer.accelerator=cpu", "trainer.devices=1", "trainer.strategy=auto", "trainer.precision=32-true",
        "model.autocast_dtype=null", "data.pin_memory=false", "data.close_kernel=3", "trainer.accumulate_grad_batches=1",
        "data.train_fps=30", "data.eval_fps=30", "trainer.check_val_every_n_epoch=1",
    ]
    cfg = load_config("svd_xt", SMOKE + stand_ins + store_overrides(tmp_path))
    metrics = train(cfg)  # its test stage reloads the best checkpoint
    assert "test/stereo4d/psnr" in metrics
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("m2s").experiment_id])
    assert run.data.metrics["train/disparity_outliers"] == 4 * 40  # the epoch's one batch of 4 frames
    assert run.data.tags["m2s.metrics.lpips_net"] == "vgg"

    # Checkpoints leave out the frozen pretrained weights; loading takes them from the directory again.
    last = output_dir(cfg) / "checkpoints" / "last.ckpt"
    state = torch.load(last, map_location="cpu", weights_only=False)["state_dict"]
    assert any(k.startswith("model.unet.") for k in state)
    assert not any(k.startswith(("model.vae.", "model.embedding.")) for k in state)
    refiner, _ = load_refiner(str(last))
    from_dir = build_refiner(pretrained=str(tiny_svd_dir))
    assert all(torch.equal(a, b) for a, b in zip(refiner.vae.parameters(), from_dir.vae.parameters()))
    assert torch.equal(refiner.unet.conv_in.weight, state["model.unet.conv_in.weight"])


def test_paper_scale_experiment_without_weights_names_the_missing_directory(tmp_path):
    with pytest.raises(ModelError, match="stable-video-diffusion-img2vid-xt"):
        train(load_config("svd_xt", SMOKE + store_overrides(tmp_path) + ["trainer.accelerator=cpu"]))
