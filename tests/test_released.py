"""The authors' released M2SVid model: import, their network's outputs reproduced, and it runs wherever a model runs.

Fixtures (tests/fixtures/m2svid_release/, data only; its README says what each file is): a stand-in of the
released weight file in its exact layout at tiny width, and the outputs of the authors' own network on it.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from lightning_m2s.benchmarks.convert import write_img2vid_parts
from lightning_m2s.cli import main as cli_main
from lightning_m2s.errors import ModelError
from lightning_m2s.models import released
from lightning_m2s.models.embedded import sha256

FIXTURES = Path(__file__).parent / "fixtures" / "m2svid_release"
WEIGHTS = FIXTURES / "m2svid_weights_standin.pt"
UNET_CONFIG = FIXTURES / "unet_config.json"


def run_import(out: Path, *flags: str, weights: Path = WEIGHTS) -> dict:
    cli_main(["import-release", str(weights), "--out", str(out), "--unet-config", str(UNET_CONFIG), *flags])
    return json.loads((out / released.RELEASE_JSON).read_text())


@pytest.fixture(scope="module")
def reference_io():
    return torch.load(FIXTURES / "reference_io.pt", weights_only=True)


@pytest.fixture(scope="module")
def sgm_state():
    return released.read_release(WEIGHTS)


@pytest.fixture(scope="module")
def unet_config():
    return json.loads(UNET_CONFIG.read_text())


@pytest.mark.parametrize("full_attention", [True, False])
def test_import_reproduces_the_authors_outputs(tmp_path, reference_io, full_attention):
    out = tmp_path / "m2svid"
    record = run_import(out, "--full-attention" if full_attention else "--no-full-attention")
    assert record["full_attention"] is full_attention and record["full_attention_from"] == "the caller"
    assert record["source"]["sha256"] == sha256(WEIGHTS) and record["source"]["file"] == str(WEIGHTS.absolute())
    assert record["unet"] == {"dtype": "float16", "tensors": 1426, "config_from": str(UNET_CONFIG)}
    from safetensors import safe_open

    with safe_open(str(out / "unet" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}

    got = released.unet_reference_forward(out, reference_io)
    want = reference_io["output_full_attention" if full_attention else "output_no_full_attention"]
    other = reference_io["output_no_full_attention" if full_attention else "output_full_attention"]
    assert got.shape == want.shape
    assert (got - want).abs().max() <= 2e-3  # the authors' sgm network on the same weights and inputs
    assert (got - other).abs().max() > 0.1  # and the setting matters


def test_full_attention_comes_from_the_release_file_names(tmp_path):
    for name, expected in (("m2svid_weights.pt", True), ("m2svid_no_full_atten_weights.pt", False)):
        link = tmp_path / name
        link.symlink_to(WEIGHTS)
        record = run_import(tmp_path / name.removesuffix(".pt"), weights=link)
        assert record["full_attention"] is expected and record["full_attention_from"] == "the file name"
        assert record["source"]["file"] == str(link)
    other = tmp_path / "weights.pt"
    other.symlink_to(WEIGHTS)
    with pytest.raises(ModelError, match="weights.pt: the file name does not say"):
        released.import_release(other, tmp_path / "other", unet_config=UNET_CONFIG)


def test_every_release_key_maps_once_and_up_block_mix_factors_stay_apart(sgm_state, unet_config):
    table = released.block_table(unet_config)
    targets = [released.diffusers_key(k, table) for k in sgm_state]
    assert None not in targets and len(set(targets)) == len(targets) == 1426
    # each up-block resnet keeps its own time_mixer.mix_factor (not two of them on one key)
    mixers = {k: t for k, t in zip(sgm_state, targets) if k.startswith("output_blocks.") and k.endswith(".0.time_mixer.mix_factor")}
    assert len(mixers) == 12 and len(set(mixers.values())) == 12
    assert mixers["output_blocks.5.0.time_mixer.mix_factor"] == "up_blocks.1.resnets.2.time_mixer.mix_factor"
    assert released.diffusers_key("output_blocks.5.2.conv.weight", table) == "up_blocks.1.upsamplers.0.conv.weight"
    assert released.diffusers_key("input_blocks.3.0.op.bias", table) == "down_blocks.0.downsamplers.0.conv.bias"


def test_a_missing_an_extra_and_a_misshapen_key_are_named(sgm_state, unet_config):
    meta = released._meta_unet(dict(unet_config), "config")
    expected = {k: v.shape for k, v in meta.state_dict().items()}
    state = dict(sgm_state)
    del state["middle_block.1.time_stack.0.attn1.to_q.weight"]
    state["input_blocks.1.1.extra_layer.weight"] = torch.zeros(3)
    with pytest.raises(ModelError) as err:
        released.convert_unet_state(state, unet_config, expected, "release.pt")
    message = str(err.value)
    assert "release.pt" in message and "\n" not in message
    assert "missing 1 key(s)" in message and "mid_block.attentions.0.temporal_transformer_blocks.0.attn1.to_q.weight" in message
    assert "unexpected 1 release key(s): input_blocks.1.1.extra_layer.weight" in message

    state = dict(sgm_state)
    state["out.2.bias"] = torch.zeros(5)
    with pytest.raises(ModelError, match=r"out.2.bias \(5,\) vs conv_out.bias \(4,\)"):
        released.convert_unet_state(state, unet_config, expected, "release.pt")


def test_a_release_file_for_another_config_is_refused_naming_the_keys(tmp_path):
    config = json.loads(UNET_CONFIG.read_text())
    config["layers_per_block"] = 1
    (tmp_path / "c.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match=r"m2svid_weights_standin.pt: the released UNet does not match .*missing"):
        released.import_release(WEIGHTS, tmp_path / "out", unet_config=tmp_path / "c.json", full_attention=True)
    assert not (tmp_path / "out").exists()  # nothing half-written
    # without a config: img2vid-xt's, whose widths the tiny stand-in does not have (640 -> 1280 needs a shortcut)
    with pytest.raises(ModelError, match=r"missing 2 key\(s\) .*down_blocks.2.resnets.0.spatial_res_block.conv_shortcut"):
        released.import_release(WEIGHTS, tmp_path / "out", full_attention=True)


class Evil:
    def __reduce__(self):
        return (os.system, (f"touch {Evil.flag}",))


@pytest.mark.parametrize("writer", ["pickle", "torch.save"])
def test_a_crafted_file_is_refused_without_running_code(tmp_path, capsys, writer):
    Evil.flag = tmp_path / "code_ran"
    evil = tmp_path / "evil.pt"
    payload = {"module": {"module.model.diffusion_model.out.2.bias": Evil()}}
    if writer == "pickle":
        evil.write_bytes(pickle.dumps(payload))
    else:
        torch.save(payload, evil)
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["import-release", str(evil), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1
    assert str(evil) in err[0] and "system" in err[0] and "refused" in err[0]
    assert not Evil.flag.exists() and not (tmp_path / "out").exists()


def test_other_unusable_files_are_named(tmp_path):
    with pytest.raises(ModelError, match="nope.pt: no such file"):
        released.read_release(tmp_path / "nope.pt")
    torch.save({"state_dict": {"a": torch.zeros(1)}}, tmp_path / "plain.pt")
    with pytest.raises(ModelError, match="plain.pt: not a DeepSpeed model-states file"):
        released.read_release(tmp_path / "plain.pt")
    torch.save({"module": {"module.first_stage_model.x": torch.zeros(1)}}, tmp_path / "vae_only.pt")
    with pytest.raises(ModelError, match="vae_only.pt: no UNet weights"):
        released.read_release(tmp_path / "vae_only.pt")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    with pytest.raises(ModelError, match="full: exists and is not empty"):
        released.import_release(WEIGHTS, tmp_path / "full", unet_config=UNET_CONFIG)


# --- the imported directory wherever a model loads ------------------------------------------------------
# (beside img2vid-xt's VAE, image encoder and feature extractor at tiny width: write_img2vid_parts)
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("release")
    svd = write_img2vid_parts(root / "svd")
    (svd / "unet").mkdir()  # img2vid-xt's UNet config (8 input channels) at the stand-in's width
    (svd / "unet" / "config.json").write_text(json.dumps({**json.loads(UNET_CONFIG.read_text()), "in_channels": 8}))
    cli_main(["import-release", str(WEIGHTS), "--out", str(root / "m2svid"), "--svd", str(svd)])
    return root / "m2svid"


def test_the_imported_directory_holds_img2vid_parts_and_loads_as_released(model_dir):
    record = json.loads((model_dir / released.RELEASE_JSON).read_text())
    parts = ["vae", "image_encoder", "feature_extractor", "scheduler"]
    assert record["full_attention"] is True and record["svd_parts"] == {"linked": parts, "copied": []}
    assert record["unet"]["config_from"].endswith("svd/unet/config.json")  # with the release's 13 input channels
    assert all((model_dir / p).is_symlink() for p in ("vae", "image_encoder", "feature_extractor", "scheduler"))
    model, settings = released.load_model_dir(model_dir)
    assert settings == {"steps": 1} and model.unet.conv_in.in_channels == 13
    assert model.attention is not None and model.attention.policy == "bilinear" and model.attention.kv_source == "pre_norm"
    assert model.cond_aug_eval == 0.02 and model.motion_bucket_id == 127

    # model.pretrained=DIR: training and fine-tuning start from it (its conv_in is already 13 wide)
    from lightning_m2s.models.refiner import build_refiner

    tuned = build_refiner(**released.model_settings(model_dir))
    assert torch.equal(tuned.unet.conv_in.weight, model.unet.conv_in.weight)


def test_a_directory_without_img2vid_parts_says_how_to_add_them(tmp_path):
    run_import(tmp_path / "bare", "--full-attention")
    with pytest.raises(ModelError, match="bare: no vae, image_encoder, feature_extractor/: import the release with --svd"):
        released.load_model_dir(tmp_path / "bare")


def test_convert_any_size_and_length_from_the_imported_directory(tmp_path, model_dir, capsys):
    from lightning_m2s.data.video_io import read_frames, video_info, write_video

    # 11 frames of 45 x 70 (odd, not square, not a multiple of the UNet's 64 px), chunks of 4 frames
    T, H, W = 11, 45, 70
    rng = np.random.default_rng(0)
    video = np.repeat(np.repeat(rng.integers(0, 255, (T, 9, 14, 3), dtype=np.uint8), 5, axis=1), 5, axis=2)
    write_video(tmp_path / "in.mp4", video, 8.0, lossless=True)
    depth = np.broadcast_to(np.linspace(1.0, 4.0, W, dtype=np.float32), (T, H, W)).copy()
    np.save(tmp_path / "depth.npy", depth)
    out = tmp_path / "out.mp4"
    cli_main(["convert", str(tmp_path / "in.mp4"), "--model", str(model_dir), "--depth", str(tmp_path / "depth.npy"),
              "--out", str(out), "--chunk-frames", "4", "--overlap-frames", "1", "--splat", "released",
              "--format", "sbs", "--no-progress", "--device", "cpu"])
    assert "11 frames 45x70" in capsys.readouterr().out
    info = video_info(out)
    assert (info.num_frames, info.height, info.width) == (T, H, 2 * W)
    assert read_frames(out, range(T))[:, :, :W].shape == video.shape  # the left half: the input, cropped back


def test_evaluate_the_imported_directory(tmp_path, model_dir, capsys):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'eval.db'}"
    cli_main(["evaluate", str(model_dir), f"tracking.uri={uri}", "data.test_clips=1", "data.eval_size=64",
              "--experiment", "debug", "--no-floors"])
    assert "per-clip metrics" in capsys.readouterr().out
    runs = [r for e in MlflowClient(uri).search_experiments() for r in MlflowClient(uri).search_runs([e.experiment_id])]
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].data.tags["m2s.checkpoint"] == str(model_dir.resolve())
    psnr = [v for k, v in runs[0].data.metrics.items() if k.endswith("/psnr")]
    assert psnr and all(np.isfinite(psnr))
