"""m2s convert: depth providers, chunk / tile schedules, the end-to-end conversion, formats, errors.

One checkpoint of the debug experiment's model (conftest's `debug_checkpoint`; conversion speed and
plumbing do not depend on training) is loaded once.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from lightning_m2s.cli import main as cli_main
from lightning_m2s.convert import (
    ConvertOptions, boundary_jumps, chunk_schedule, convert, model_alignment, ramp, refine_latent, tile_starts,
)
from lightning_m2s.convert import refine as refine_stage  # where the model stage looks refine_latent up
from lightning_m2s.data.sources.synthetic import SyntheticSource
from lightning_m2s.data.video_io import read_frames, video_info, write_video
from lightning_m2s.depth import (
    blend_windows, estimate_depth, fit_scale_shift, inverse_range, normalised_disparity, open_depth_file,
)
from lightning_m2s.errors import ConfigError, DataError, GeometryError, M2SError, ModelError
from lightning_m2s.geometry import depth_to_disparity


# --- fixtures -------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def checkpoint(debug_checkpoint) -> Path:
    return debug_checkpoint


@pytest.fixture(scope="session")
def model(checkpoint):
    from lightning_m2s.modules import load_refiner

    return load_refiner(str(checkpoint))[0]


def make_video(root: Path, frames: int, height: int, width: int, seed: int = 7, name: str = "in") -> tuple[Path, np.ndarray]:
    """A synthetic left video (lossless) and its positive depth [T, H, W] (1 / (disparity + 1))."""
    src = SyntheticSource(num_videos=1, size=(height, width), num_frames=frames, seed=seed, max_disparity=8)
    r = src.render(0, np.arange(frames))
    path = write_video(Path(root) / f"{name}.mp4", r["left"], fps=24.0, lossless=True)
    return path, (1.0 / (r["disparity"].astype(np.float32) + 1.0))


@pytest.fixture(scope="session")
def clip(tmp_path_factory):
    root = tmp_path_factory.mktemp("clip")
    video, depth = make_video(root, 6, 32, 64)  # decord misreads some tiny widths (16, 24, 48, 72)
    np.savez(root / "depth.npz", depth=depth)
    return SimpleNamespace(root=root, video=video, depth=depth, npz=root / "depth.npz")


def sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


QUICK = dict(progress=False, lossless=True)


# --- schedules and blending ------------------------------------------------------------------------------
@pytest.mark.parametrize("c, o", [(16, 4), (8, 2), (6, 5), (4, 0)])
def test_chunk_schedule_writes_every_frame_once_from_a_chunk_that_saw_it(c, o):
    for n in range(1, 401):
        chunks = chunk_schedule(n, c, o)
        assert chunks[0].start == 0 and chunks[0].known == 0 and chunks[-1].written == n
        assert all(ch.stop - ch.start == min(n, c) for ch in chunks)  # constant chunk size, never above c
        written = [i for ch in chunks for i in range(ch.start, ch.written)]
        assert written == list(range(n)), n  # every frame written exactly once, in order ...
        assert all(ch.start <= ch.written <= ch.stop for ch in chunks)  # ... by a chunk that saw it
        for prev, ch in zip(chunks, chunks[1:]):
            assert ch.start == prev.written and ch.known == prev.stop - ch.start  # held frames = next known
            assert o <= ch.known < ch.stop - ch.start and ch.stop > prev.stop  # the last m carried; progress
    with pytest.raises(ConfigError):
        chunk_schedule(10, 4, 4)


@pytest.mark.parametrize("frames, chunk, overlap", [(1, 16, 4), (29, 16, 4), (41, 16, 4), (17, 16, 4), (13, 8, 2), (11, 6, 5)])
def test_cli_converts_every_length_frame_for_frame(tmp_path, checkpoint, frames, chunk, overlap):
    video, depth = make_video(tmp_path, frames, 16, 16)
    np.save(tmp_path / "d.npy", depth)
    out = tmp_path / "out.mp4"
    cli_main(["convert", str(video), "--checkpoint", str(checkpoint), "--depth", str(tmp_path / "d.npy"), "--out", str(out),
              "--chunk-frames", str(chunk), "--overlap-frames", str(overlap), "--no-progress"])
    assert video_info(out).num_frames == frames


def test_tile_starts_and_ramps():
    assert tile_starts(64, 64, 16) == [0] and tile_starts(48, 64, 16) == [0]
    starts = tile_starts(96, 32, 8)
    assert starts[0] == 0 and starts[-1] == 64 and all(b - a <= 24 for a, b in zip(starts, starts[1:]))
    w = ramp(8, 3, rise=True, fall=False)
    assert torch.allclose(w[:4], torch.tensor([0.25, 0.5, 0.75, 1.0])) and (w[4:] == 1).all()
    assert (ramp(8, 3, False, False) == 1).all() and (ramp(8, 3, True, True) > 0).all()


class _PositionModel(torch.nn.Module):
    """A stand-in refiner whose latent is the average-pooled left image: tiles must blend to the untiled result."""

    def __init__(self):
        super().__init__()
        self.vae = SimpleNamespace(downscale=8, latent_channels=4)
        self.unet = SimpleNamespace(config=SimpleNamespace(block_out_channels=(32, 64)))
        self.cond_aug_eval = 0.0

    def build_conditioning(self, left, warped, mask, fps_id, cond_aug, generator=None):
        return left

    def generate(self, left, steps, generator):
        B, T = left.shape[:2]
        pooled = torch.nn.functional.avg_pool2d(left.flatten(0, 1), 8).unflatten(0, (B, T))
        return torch.cat([pooled, pooled[:, :, :1]], dim=2)  # 4 channels


def test_tiles_blend_seamlessly_in_latent_space():
    H, W = 64, 96
    yy, xx = torch.meshgrid(torch.arange(H).float(), torch.arange(W).float(), indexing="ij")
    left = torch.stack([yy / H, xx / W, torch.sin(xx / 7) * torch.cos(yy / 5)])[None].expand(3, -1, -1, -1)
    mask = torch.zeros(3, H, W, dtype=torch.bool)
    m = _PositionModel()
    whole = refine_latent(m, left, left, mask)
    for tile, overlap in [(32, 16), (48, 8), (32, 0), (128, 16)]:
        tiled = refine_latent(m, left, left, mask, tile=tile, tile_overlap=overlap)
        assert tiled.shape == whole.shape == (1, 3, 4, H // 8, W // 8)
        torch.testing.assert_close(tiled, whole)


def test_boundary_jumps():
    means = np.zeros((10, 3))
    means[5:] += 10.0  # a jump between frames 4 and 5
    j = boundary_jumps(means, [(3, 5)])
    assert j["boundary"] == pytest.approx(10.0) and j["within"] == 0.0
    means[:] = np.arange(10)[:, None]  # a steady ramp: no seam
    j = boundary_jumps(means, [(3, 5)])
    assert j["boundary"] == pytest.approx(1.0) and j["within"] == pytest.approx(1.0)


# --- depth providers -------------------------------------------------------------------------------------
def test_depth_files_npz_npy_png_video_agree(tmp_path, clip):
    depth = clip.depth  # [T, H, W] > 0
    inverse = 1.0 / depth
    np.save(tmp_path / "d.npy", depth)
    np.savez(tmp_path / "inv.npz", disparity=inverse)
    scaled = np.round(inverse / inverse.max() * 65535).astype(np.uint16)
    png = tmp_path / "png"
    png.mkdir()
    from PIL import Image

    for i, frame in enumerate(scaled):
        Image.fromarray(frame).save(png / f"{i:05d}.png")
    grey = np.round(inverse / inverse.max() * 255).astype(np.uint8)
    write_video(tmp_path / "depth.mp4", np.repeat(grey[..., None], 3, -1), lossless=True)

    T, H, W = depth.shape
    full = torch.from_numpy(depth_to_disparity(torch.from_numpy(depth), 10.0).numpy())
    for path, tol in [(clip.npz, 1e-4), (tmp_path / "d.npy", 1e-4), (tmp_path / "inv.npz", 1e-4), (png, 1e-3),
                      (tmp_path / "depth.mp4", 0.1)]:
        src = open_depth_file(path)
        assert (src.num_frames, src.height, src.width) == (T, H, W), path
        src.check_matches(T, H, W, "video.mp4")
        rng = inverse_range(src, chunk=4)  # chunked first pass = one normalisation per video
        parts = [normalised_disparity(torch.from_numpy(src.inverse(s, min(s + 4, T))), rng, 10.0) for s in range(0, T, 4)]
        torch.testing.assert_close(torch.cat(parts), full, atol=tol * 10, rtol=0, msg=str(path))


def test_a_pass_over_a_npy_depth_keeps_one_chunk_resident(tmp_path):
    """Reading a long depth file chunk by chunk must not leave the whole file in the process's memory
    (a kept memory map would: every page read stays resident)."""
    path = tmp_path / "long.npy"
    depth = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(400, 240, 320))  # 123 MB
    depth[:] = np.linspace(1, 2, 400, dtype=np.float32)[:, None, None]
    depth.flush()
    del depth

    def resident_mb() -> float:
        return int(Path("/proc/self/status").read_text().split("VmRSS:")[1].split()[0]) / 1024

    src = open_depth_file(path)
    before = resident_mb()
    lo, hi = inverse_range(src, chunk=16)
    assert (lo, hi) == pytest.approx((0.5, 1.0))
    assert resident_mb() - before < 40, "the depth file stayed resident after the pass"


def test_depth_file_errors(tmp_path, clip):
    with pytest.raises(DataError, match="not found"):
        open_depth_file(tmp_path / "nope.npz")
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError, match="bad.npz"):
        open_depth_file(tmp_path / "bad.npz")
    np.save(tmp_path / "flat.npy", np.zeros((4, 8)))
    with pytest.raises(DataError, match=r"flat.npy.*\[T, H, W\]"):
        open_depth_file(tmp_path / "flat.npy")
    np.save(tmp_path / "zero.npy", np.zeros((4, 8, 8)))
    with pytest.raises(GeometryError, match="zero.npy.*depth-kind inverse"):
        inverse_range(open_depth_file(tmp_path / "zero.npy"))
    src = open_depth_file(clip.npz)
    with pytest.raises(DataError, match="6 frames but video v.mp4 has 7"):
        src.check_matches(7, 32, 64, "v.mp4")
    with pytest.raises(DataError, match="32x64 but video v.mp4 frames are 32x50"):
        src.check_matches(6, 32, 50, "v.mp4")


def test_blend_windows_aligns_scale_and_shift():
    rng = np.random.default_rng(0)
    truth = rng.random((30, 4, 5)).astype(np.float32) + np.linspace(0, 1, 30, dtype=np.float32)[:, None, None]
    calls = []

    def predict(s, e):  # each window gets its own affine ambiguity, as a relative-depth model's
        calls.append((s, e))
        a, b = 0.5 + len(calls), 3.0 * len(calls)
        return a * truth[s:e] + b

    out = np.full_like(truth, np.nan)
    blend_windows(predict, 30, lambda s, f: out.__setitem__(slice(s, s + len(f)), f), window=10, overlap=3)
    assert calls[0] == (0, 10) and all(e - s <= 10 for s, e in calls) and calls[-1][1] == 30
    s, b = fit_scale_shift(truth, out)
    np.testing.assert_allclose(s * truth + b, out, atol=1e-4)  # one affine map for the whole video


@pytest.fixture(scope="session")
def tiny_depth_model(tmp_path_factory) -> Path:
    """A tiny random Depth Anything saved with save_pretrained, its image processor beside it."""
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config, DPTImageProcessor

    root = tmp_path_factory.mktemp("depth_model") / "tiny-depth-anything"
    backbone = Dinov2Config(hidden_size=16, num_hidden_layers=4, num_attention_heads=2, intermediate_size=32, image_size=28,
                            patch_size=14, out_features=["stage1", "stage2", "stage3", "stage4"], reshape_hidden_states=False)
    config = DepthAnythingConfig(backbone_config=backbone, reassemble_hidden_size=16, neck_hidden_sizes=[8, 8, 8, 8],
                                 fusion_hidden_size=8, head_hidden_size=8, patch_size=14)
    torch.manual_seed(0)
    DepthAnythingForDepthEstimation(config).save_pretrained(root)
    DPTImageProcessor(size={"height": 28, "width": 28}, keep_aspect_ratio=True, ensure_multiple_of=14).save_pretrained(root)
    return root


def test_transformers_depth_model_in_windows(tmp_path, clip, tiny_depth_model):
    src = estimate_depth(clip.video, tiny_depth_model, tmp_path / "depth.npy", window=4, overlap=2)
    T, H, W = clip.depth.shape
    assert (src.num_frames, src.height, src.width, src.kind) == (T, H, W, "inverse")
    inv = src.inverse(0, T)
    assert inv.shape == (T, H, W) and np.isfinite(inv).all()
    with pytest.raises(ModelError, match="no-such-model"):
        estimate_depth(clip.video, tmp_path / "no-such-model", tmp_path / "d2.npy")


# --- the conversion --------------------------------------------------------------------------------------
def test_cli_end_to_end_writes_stereo_and_leaves_the_input(tmp_path, clip, checkpoint, capsys):
    before = sha(clip.video)
    out = tmp_path / "out" / "stereo.mp4"
    cli_main(["convert", str(clip.video), "--checkpoint", str(checkpoint), "--out", str(out), "--depth", str(clip.npz),
              "--format", "sbs", "--no-progress", "--lossless", "--save-intermediates", str(tmp_path / "inter")])
    assert "wrote" in capsys.readouterr().out
    info = video_info(out)
    assert (info.num_frames, info.height, info.width, info.fps) == (6, 32, 128, 24.0)
    assert sha(clip.video) == before
    assert sorted(p.name for p in out.parent.iterdir()) == ["stereo.mp4"]  # no temporary left behind
    for name in ("depth", "warped", "mask"):
        assert video_info(tmp_path / "inter" / f"{name}.mp4").num_frames == 6
    frames = read_frames(out)
    np.testing.assert_array_equal(frames[:, :, :64], read_frames(clip.video))  # sbs: the left view untouched


@pytest.mark.parametrize("layout, size", [("sbs", (32, 128)), ("half-sbs", (32, 64)), ("top-bottom", (64, 64)),
                                          ("half-top-bottom", (32, 64)), ("anaglyph", (32, 64)), ("right", (32, 64))])
def test_output_format_frame_sizes(tmp_path, clip, model, layout, size):
    report = convert(clip.video, None, tmp_path / f"{layout}.mp4", depth=clip.npz, model=model, format=layout, **QUICK)
    info = video_info(tmp_path / f"{layout}.mp4")
    assert (info.num_frames, info.height, info.width) == (6, *size)
    assert report.format == layout and report.frames == 6


def test_odd_frame_sizes_are_padded_and_cropped_back(tmp_path, model):
    for h, w in [(50, 70), (33, 41)]:
        video, depth = make_video(tmp_path, 4, h, w, name=f"v{h}x{w}")
        np.save(tmp_path / f"d{h}x{w}.npy", depth)
        report = convert(video, None, tmp_path / f"o{h}x{w}.mp4", depth=tmp_path / f"d{h}x{w}.npy", model=model,
                         format="sbs", progress=False)
        info = video_info(tmp_path / f"o{h}x{w}.mp4")
        assert (info.num_frames, info.height, info.width) == (4, h, 2 * w)
        align = model_alignment(model)[0]  # 8 px for the tiny default (4x VAE, 2x UNet)
        assert report.padded == [-(-h // align) * align, -(-w // align) * align]


def test_long_video_runs_in_bounded_autoregressive_chunks(tmp_path, model, monkeypatch):
    video, depth = make_video(tmp_path, 17, 32, 32)
    np.save(tmp_path / "d.npy", depth)
    calls = []
    real = refine_stage.refine_latent

    def spy(m, left, warped, mask, **kw):
        calls.append((left.shape[0], warped.clone(), mask.clone()))
        return real(m, left, warped, mask, **kw)

    monkeypatch.setattr(refine_stage, "refine_latent", spy)
    decoded = []
    real_decode = type(model).decode
    monkeypatch.setattr(type(model), "decode", lambda self, z, n=None: decoded.append(real_decode(self, z, n)) or decoded[-1])
    report = convert(video, None, tmp_path / "long.mp4", depth=tmp_path / "d.npy", model=model, format="right",
                     chunk_frames=6, overlap_frames=2, **QUICK)
    assert video_info(tmp_path / "long.mp4").num_frames == 17
    schedule = chunk_schedule(17, 6, 2)  # (0, 6), (4, 10), (8, 14), (11, 17)
    assert report.chunks == len(schedule) == len(calls) == 4 and all(t == 6 for t, _, _ in calls)
    # App. E: the known frames of chunk k are chunk k-1's generated frames, with an empty mask
    for k in range(1, len(schedule)):
        s, known, ps = schedule[k].start, schedule[k].known, schedule[k - 1].start
        _, warped, mask = calls[k]
        assert not mask[:known].any()
        expected = decoded[k - 1][0, s - ps : s - ps + known].clamp(-1, 1)
        torch.testing.assert_close(warped[:known], expected)
    assert report.boundary_jump >= 0 and report.within_chunk_jump >= 0


def test_one_covering_tile_equals_no_tiling(tmp_path, clip, model):
    a = convert(clip.video, None, tmp_path / "a.mp4", depth=clip.npz, model=model, format="right", **QUICK)
    b = convert(clip.video, None, tmp_path / "b.mp4", depth=clip.npz, model=model, format="right", tile=64, **QUICK)
    assert b.tiles_per_chunk == 1
    np.testing.assert_array_equal(read_frames(tmp_path / "a.mp4"), read_frames(tmp_path / "b.mp4"))
    c = convert(clip.video, None, tmp_path / "c.mp4", depth=clip.npz, model=model, format="right", tile=32,
                tile_overlap=16, **QUICK)
    assert c.tiles_per_chunk == 3 and video_info(tmp_path / "c.mp4").num_frames == 6  # 32x64: columns at 0, 16, 32


def test_failed_conversion_leaves_no_partial_file(tmp_path, clip, model, monkeypatch):
    out = tmp_path / "out.mp4"
    out.write_bytes(b"previous result")
    calls = []
    real = refine_stage.refine_latent

    def fail_second(*args, **kwargs):  # the first chunk is written, the second fails
        calls.append(1)
        if len(calls) > 1:
            raise DataError("simulated failure in chunk 2")
        return real(*args, **kwargs)

    monkeypatch.setattr(refine_stage, "refine_latent", fail_second)
    with pytest.raises(DataError, match="simulated"):
        convert(clip.video, None, out, depth=clip.npz, model=model, chunk_frames=4, overlap_frames=1, **QUICK)
    assert out.read_bytes() == b"previous result"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.mp4"]


def test_errors_name_the_file(tmp_path, clip, checkpoint, model, capsys):
    out = tmp_path / "o.mp4"
    with pytest.raises(DataError, match="missing.mp4"):
        convert(tmp_path / "missing.mp4", checkpoint, out, depth=clip.npz)
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8)
    with pytest.raises(DataError, match="corrupt.mp4"):
        convert(corrupt, checkpoint, out, depth=clip.npz)
    with pytest.raises(ModelError, match="nope.ckpt"):
        convert(clip.video, tmp_path / "nope.ckpt", out, depth=clip.npz)
    np.savez(tmp_path / "short.npz", depth=clip.depth[:4])
    with pytest.raises(DataError, match="short.npz has 4 frames"):
        convert(clip.video, None, out, depth=tmp_path / "short.npz", model=model, progress=False)
    np.savez(tmp_path / "small.npz", depth=clip.depth[:, :16])
    with pytest.raises(DataError, match="small.npz frames are 16x64"):
        convert(clip.video, None, out, depth=tmp_path / "small.npz", model=model, progress=False)
    tiny = write_video(tmp_path / "onepx.mp4", np.zeros((3, 1, 32, 3), np.uint8), lossless=True)
    np.save(tmp_path / "onepx.npy", np.ones((3, 1, 32)))
    with pytest.raises(DataError, match="onepx.mp4 frames are 1x32"):
        convert(tiny, None, out, depth=tmp_path / "onepx.npy", model=model)
    with pytest.raises(ConfigError, match="exactly one depth"):
        convert(clip.video, None, out, model=model)
    with pytest.raises(ConfigError, match="is the input"):
        convert(clip.video, None, clip.video, depth=clip.npz, model=model)
    with pytest.raises(ConfigError, match="format"):
        convert(clip.video, None, out, depth=clip.npz, model=model, format="sideways")
    with pytest.raises(ConfigError, match="extension"):
        convert(clip.video, None, tmp_path / "o.gif", depth=clip.npz, model=model)
    with pytest.raises(ModelError, match="missing-model-dir"):
        convert(clip.video, None, out, depth_model=tmp_path / "missing-model-dir", model=model, progress=False)
    assert not out.exists()
    # the CLI turns them into one line naming the file and exit code 2
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["convert", str(clip.video), "--checkpoint", str(tmp_path / "nope.ckpt"), "--out", str(out),
                  "--depth", str(clip.npz)])
    assert exit_info.value.code == 2 and "nope.ckpt" in capsys.readouterr().err


def test_convert_with_a_local_depth_model(tmp_path, clip, model, tiny_depth_model):
    report = convert(clip.video, None, tmp_path / "o.mp4", depth_model=tiny_depth_model, model=model, format="anaglyph",
                     save_intermediates=str(tmp_path / "inter"), **QUICK)
    assert report.frames == 6 and video_info(tmp_path / "o.mp4").num_frames == 6
    assert np.load(tmp_path / "inter" / "depth.npy").shape == (6, 32, 64)


def test_help_lists_the_formats(capsys):
    with pytest.raises(SystemExit):
        cli_main(["convert", "--help"])
    text = capsys.readouterr().out
    for word in ("sbs", "half-sbs", "top-bottom", "anaglyph", "right"):
        assert word in text
    assert isinstance(ConfigError("x"), M2SError) and ConvertOptions().format == "sbs"


def test_convert_warps_with_the_splat_the_model_was_trained_with(tmp_path, clip, model):
    convert(clip.video, None, tmp_path / "r.mp4", depth=clip.npz, model=model, format="right", splat="released",
            save_intermediates=str(tmp_path / "released"), max_disparity=5.5, **QUICK)
    convert(clip.video, None, tmp_path / "n.mp4", depth=clip.npz, model=model, format="right",
            save_intermediates=str(tmp_path / "nearest"), max_disparity=5.5, **QUICK)
    released, nearest = (read_frames(tmp_path / name / "warped.mp4") for name in ("released", "nearest"))
    assert not np.array_equal(released, nearest)
    with pytest.raises(ConfigError, match="splat 'bilinear'"):
        convert(clip.video, None, tmp_path / "x.mp4", depth=clip.npz, model=model, splat="bilinear", **QUICK)


def test_the_default_tile_fits_the_free_gpu_memory():
    from lightning_m2s.convert import BYTES_PER_FRAME_PIXEL, MEMORY_SHARE, memory_tile

    need = 16 * 512 * 512 * BYTES_PER_FRAME_PIXEL / MEMORY_SHARE  # a 16-frame chunk of 512^2 in fp16
    assert memory_tile(int(need * 1.01), 16, 512, 512, 64) is None  # the whole frame fits
    tile = memory_tile(int(need / 4 * 1.01), 16, 512, 512, 64)  # a quarter of that: tiles of half the side
    assert tile == 256 and tile % 64 == 0
    assert memory_tile(int(need / 4 * 1.01), 16, 512, 512, 64, bytes_per_value=4) < tile  # fp32 takes twice the memory
    assert memory_tile(1, 16, 512, 512, 64) == 16  # never below the smallest side
