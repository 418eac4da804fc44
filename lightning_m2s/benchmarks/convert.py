"""`m2s bench convert`: conversion speed per stage at real sizes, and memory, on the embedded default.

Synthetic layered-scene videos (with their exact depth) are converted to side-by-side by the embedded
default (the shipped tiny SVD, widened as for fine-tuning; speed does not depend on the fine-tune; set
M2S_BENCH_CHECKPOINT to measure a trained one) at 64x64 (100 and 300 frames: memory in video length),
320x240 and 720x528 (tiles of 128 px: the tiny VAE's 2x latents would make its attention span 95k
cells per frame). Each video runs in its own subprocess, so each has its own peak RSS (after a warm-up
conversion of a short 64 px clip: kernel compilation, thread pools). For each it reports frames per
second, seconds per frame of every stage (read, depth, splat = splat + closing, encode, unet, decode,
write = compose + encode the video; read, depth and splat run in a reader thread, write in a writer
thread, beside the model) and `non_model_fraction`, the share of the wall time outside the model.
The 1-step vs 25-step latency ratio is measured on one 16-frame 64 px chunk in this process, and the
chunk-boundary jump (mean absolute change of the per-frame mean colour across chunk boundaries vs
within chunks) comes with each run. `imported`: the same figures for the authors' model imported by `m2s
import-release` (fp16 autocast on a GPU, with peak GPU memory): M2S_BENCH_MODEL=DIR at 540x960 and 1080x1920
(tiles of 512 px), else the release stand-in of the tests at 120x200 (its speed is not the real model's; it
measures the pipeline around it). `m2s bench convert_memory`: peak RSS against video length, 300 vs
1000 frames at 64x64 (5 minutes on 2 cores) and at 320x240 (about 2 hours).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

CHUNK, OVERLAP = 16, 4
# name -> (height, width, lengths, tile)
SIZES = {"64x64": (64, 64, (100, 300), None), "320x240": (240, 320, (16,), None), "720x528": (528, 720, (4,), 128)}
QUICK_SIZES = {"64x64": (64, 64, (24, 72), None), "96x64": (64, 96, (8,), 32)}
# The authors' model imported by m2s import-release (`imported` in the report): odd sizes, padded to the
# UNet's 64 px and cropped back; the stand-in on a CPU, M2S_BENCH_MODEL's (img2vid-xt scale) on a GPU.
IMPORTED_STANDIN_SIZES = {"120x200": (120, 200, (40,), None)}
IMPORTED_SIZES = {"540x960": (540, 960, (40,), None), "1080x1920": (1080, 1920, (16,), 512)}
MEMORY_SIZES = {"64x64": (64, 64, (300, 1000), None), "320x240": (240, 320, (300, 1000), None)}


def write_checkpoint(path: Path) -> Path:
    """A checkpoint of the embedded default before fine-tuning (the shipped weights, conv_in widened)."""
    import lightning as L

    from lightning_m2s.config import load_config
    from lightning_m2s.train import build_module

    module = build_module(load_config("tiny", [f"meta.output_dir={path.parent / 'unused'}"]))
    trainer = L.Trainer(logger=False, enable_checkpointing=False, accelerator="cpu", enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.strategy.connect(module)
    trainer.save_checkpoint(path)
    return path


def write_video(root: Path, frames: int, height: int, width: int, name: str = "in") -> tuple[Path, Path]:
    from lightning_m2s.data.sources.synthetic import SyntheticSource
    from lightning_m2s.data.video_io import write_video

    src = SyntheticSource(num_videos=1, size=(height, width), num_frames=frames, seed=3,
                          max_disparity=max(6, width // 20))
    video, depth = root / f"{name}{height}x{width}x{frames}.mp4", root / f"{name}{height}x{width}x{frames}.npy"
    r = src.render(0, np.arange(frames))
    write_video(video, r["left"], fps=24.0)
    np.save(depth, 1.0 / (r["disparity"].astype(np.float32) + 1.0))
    return video, depth


def _child(video: str, depth: str, warm_video: str, warm_depth: str, checkpoint: str, out: str, tile: str) -> None:
    """One conversion in a fresh process, after a warm-up conversion of a short clip; prints its report
    with the process's peak RSS (and peak GPU memory on a GPU). `checkpoint` may be a model directory
    (m2s import-release), converted as released: fp16 autocast on a GPU, the release's splat."""
    import torch

    from lightning_m2s.bench import peak_rss_mb
    from lightning_m2s.convert import convert

    kw = dict(format="sbs", chunk_frames=CHUNK, overlap_frames=OVERLAP, progress=False)
    if Path(checkpoint).is_dir():
        from lightning_m2s.models.released import load_model_dir

        model, _ = load_model_dir(checkpoint)
        kw.update(splat="released", dtype="float16" if torch.cuda.is_available() else None)
    else:
        from lightning_m2s.modules import load_refiner

        model, _ = load_refiner(checkpoint)
    convert(warm_video, None, out, depth=warm_depth, model=model, **kw)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    tile_px = int(tile) if tile != "none" else None
    report = dataclasses.asdict(convert(video, None, out, depth=depth, model=model, tile=tile_px, **kw))  # printed as JSON
    report["peak_rss_mb"] = peak_rss_mb()
    if torch.cuda.is_available():
        report["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    print(json.dumps(report))


def run_child(video: Path, depth: Path, warm: tuple[Path, Path], checkpoint: Path, out: Path, tile: int | None) -> dict:
    code = "import sys; from lightning_m2s.benchmarks.convert import _child; _child(*sys.argv[1:])"
    args = [str(video), str(depth), str(warm[0]), str(warm[1]), str(checkpoint), str(out), str(tile or "none")]
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"convert benchmark child failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure_sizes(sizes: dict, root: Path, checkpoint: Path) -> dict:
    """{size: {frames: figures}} for every size and length in `sizes`."""
    warm = write_video(root, CHUNK + OVERLAP + 4, 64, 64, name="warm")  # two chunks
    result: dict = {}
    for name, (height, width, lengths, tile) in sizes.items():
        runs = {}
        for n in lengths:
            video, depth = write_video(root, n, height, width)
            rep = run_child(video, depth, warm, checkpoint, root / f"out{name}.mp4", tile)
            video.unlink()
            runs[str(n)] = {
                "frames_per_second": round(rep["frames_per_second"], 3),
                "seconds": round(rep["seconds"], 2),
                "stage_seconds_per_frame": {k: round(v, 4) for k, v in rep["stage_seconds_per_frame"].items()},
                "non_model_fraction": round(rep["non_model_fraction"], 4),
                "peak_rss_mb": round(rep["peak_rss_mb"], 1),
                **({"peak_gpu_mb": round(rep["peak_gpu_mb"], 1)} if "peak_gpu_mb" in rep else {}),
                "chunks": rep["chunks"],
                "tiles_per_chunk": rep["tiles_per_chunk"],
                "boundary_jump": round(rep["boundary_jump"], 4),
                "within_chunk_jump": round(rep["within_chunk_jump"], 4),
                "input_boundary_jump": round(rep["input_boundary_jump"], 4),
                "input_within_jump": round(rep["input_within_jump"], 4),
            }
        entry = {"tile": tile, "runs": runs, "non_model_fraction": max(r["non_model_fraction"] for r in runs.values())}
        if len(lengths) == 2:
            a, b = (runs[str(n)]["peak_rss_mb"] for n in lengths)
            entry["peak_rss_growth_mb"], entry["peak_rss_ratio"] = round(b - a, 1), round(b / a, 3)
        result[name] = entry
    return result


def _step_latency(checkpoint: Path, video: Path, depth: Path, steps: int, repeats: int) -> tuple[float, float]:
    """Best seconds to refine one CHUNK-frame clip: (whole: condition encoding, `steps` UNet evaluations and
    VAE decoding; denoising only: the `steps` UNet evaluations from a built condition)."""
    import torch

    from lightning_m2s.bench import best_time
    from lightning_m2s.convert import refine_latent
    from lightning_m2s.data.clip import to_float_video
    from lightning_m2s.data.video_io import read_frames
    from lightning_m2s.depth import normalised_disparity
    from lightning_m2s.geometry import close_mask, forward_splat
    from lightning_m2s.modules import load_refiner

    model, _ = load_refiner(str(checkpoint))
    left = to_float_video(read_frames(video, range(CHUNK)))
    inv = 1.0 / torch.from_numpy(np.load(depth)[:CHUNK].copy())
    disparity = normalised_disparity(inv, (float(inv.min()), float(inv.max())), int(0.05 * left.shape[-1]))
    warped, holes = forward_splat(left, disparity)
    mask = close_mask(holes, 3)
    whole = lambda: model.decode(refine_latent(model, left, warped, mask, steps=steps), 8)  # noqa: E731
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        cond = model.build_conditioning(left[None], warped[None], mask[None, :, None], fps_id=24, cond_aug=0.02,
                                        generator=generator)
    denoise = lambda: model.generate(cond, steps, generator)  # noqa: E731
    with torch.no_grad():
        return best_time(whole, repeats=repeats, warmup=1), best_time(denoise, repeats=repeats, warmup=1)


def write_img2vid_parts(root: Path) -> Path:
    """img2vid-xt's VAE (8x, 4 latent channels), image encoder (64-wide embeddings: the release stand-in's
    context width) and feature extractor at tiny random width, in diffusers format."""
    import torch
    from diffusers import AutoencoderKLTemporalDecoder, EulerDiscreteScheduler
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        AutoencoderKLTemporalDecoder(block_out_channels=(32, 32, 32, 32), down_block_types=("DownEncoderBlock2D",) * 4,
                                     latent_channels=4, layers_per_block=1).save_pretrained(root / "vae")
        clip = CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                                image_size=32, patch_size=8, projection_dim=64)
        CLIPVisionModelWithProjection(clip).save_pretrained(root / "image_encoder")
    CLIPImageProcessor(crop_size=32, size=32).save_pretrained(root / "feature_extractor")
    EulerDiscreteScheduler(prediction_type="v_prediction", use_karras_sigmas=True, sigma_min=0.002,
                           sigma_max=700.0, timestep_type="continuous").save_config(root / "scheduler")
    return root


def _imported_model(root: Path) -> tuple[Path, str]:
    """M2S_BENCH_MODEL (an imported directory of the authors' model), else the release stand-in of the
    tests imported beside tiny img2vid-xt parts (the authors' block structure at tiny width, random)."""
    given = os.environ.get("M2S_BENCH_MODEL")
    if given:
        return Path(given), given
    from lightning_m2s.models.released import import_release

    fixtures = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "m2svid_release"
    import_release(fixtures / "m2svid_weights_standin.pt", root / "m2svid", svd=write_img2vid_parts(root / "img2vid"),
                   unet_config=fixtures / "unet_config.json", full_attention=True)
    return root / "m2svid", "the release stand-in (tiny width, random weights), imported with m2s import-release"


def _checkpoint(root: Path) -> tuple[Path, str]:
    given = os.environ.get("M2S_BENCH_CHECKPOINT")
    return (Path(given), given) if given else (write_checkpoint(root / "model.ckpt"), "embedded default, not fine-tuned")


def run(quick: bool = False) -> dict:
    result: dict = {"chunk_frames": CHUNK, "overlap_frames": OVERLAP, "format": "sbs"}
    with tempfile.TemporaryDirectory(prefix="m2s-bench-convert-") as tmp:
        root = Path(tmp)
        checkpoint, result["checkpoint"] = _checkpoint(root)
        result["sizes"] = measure_sizes(QUICK_SIZES if quick else SIZES, root, checkpoint)
        video, depth = write_video(root, CHUNK, 64, 64, name="latency")
        start = time.perf_counter()
        one, one_denoise = _step_latency(checkpoint, video, depth, steps=1, repeats=3)
        many, many_denoise = _step_latency(checkpoint, video, depth, steps=25, repeats=1)
        result["latency_s_1_step"] = round(one, 3)
        result["latency_s_25_steps"] = round(many, 3)
        result["latency_ratio_25_vs_1"] = round(many / one, 2)  # whole clip: encode + steps + decode
        result["denoise_s_1_step"] = round(one_denoise, 4)
        result["denoise_s_25_steps"] = round(many_denoise, 3)
        result["denoise_ratio_25_vs_1"] = round(many_denoise / one_denoise, 2)  # the UNet part alone
        result["latency_clip"] = f"{CHUNK}x64x64"
        result["latency_bench_seconds"] = round(time.perf_counter() - start, 1)
        model_dir, name = _imported_model(root)
        sizes = IMPORTED_SIZES if os.environ.get("M2S_BENCH_MODEL") else IMPORTED_STANDIN_SIZES
        result["imported"] = {"model": name, "sizes": measure_sizes(sizes, root, model_dir)}
    return result


def run_memory(quick: bool = False) -> dict:
    """Peak RSS against video length (MEMORY_SIZES; quick: 24 vs 72 frames at 64 px)."""
    with tempfile.TemporaryDirectory(prefix="m2s-bench-convert-") as tmp:
        root = Path(tmp)
        checkpoint, name = _checkpoint(root)
        sizes = {"64x64": (64, 64, (24, 72), None)} if quick else MEMORY_SIZES
        return {"chunk_frames": CHUNK, "overlap_frames": OVERLAP, "checkpoint": name,
                "sizes": measure_sizes(sizes, root, checkpoint)}
