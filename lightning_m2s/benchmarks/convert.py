"""`m2s bench convert`: conversion frames per second and peak memory on the embedded default.

A synthetic layered-scene video (with its exact depth) of 100 and 300 frames at 64x64 is converted to
side-by-side by the embedded default's architecture (tiny SVD UNet + tiny VAE; an untrained module's
checkpoint written to a temporary folder: speed does not depend on training; set
M2S_BENCH_CHECKPOINT to measure a trained one). Each length runs in its own subprocess, so each has its
own peak RSS (after a warm-up conversion of a short clip in the same process): memory stays flat as the video grows when chunks are streamed from and to disk. The 1-step
vs 25-step latency ratio is measured on one 16-frame chunk of the same clip in this process (ratios
within one run: the machine is shared and noisy). The chunk-boundary jump (mean absolute change of the
per-frame mean colour across chunk boundaries vs within chunks) comes with each run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SIZE = 64
CHUNK, OVERLAP = 16, 4


def _write_checkpoint(path: Path) -> Path:
    import lightning as L

    from lightning_m2s.config import load_config
    from lightning_m2s.train import build_module

    module = build_module(load_config("debug", [f"meta.output_dir={path.parent / 'unused'}"]))
    trainer = L.Trainer(logger=False, enable_checkpointing=False, accelerator="cpu", enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.strategy.connect(module)
    trainer.save_checkpoint(path)
    return path


def _write_video(root: Path, frames: int) -> tuple[Path, Path]:
    from lightning_m2s.data.sources.synthetic import SyntheticSource
    from lightning_m2s.data.video_io import write_video

    src = SyntheticSource(num_videos=1, size=(SIZE, SIZE), num_frames=frames, seed=3, max_disparity=6)
    video, depth = root / f"in{frames}.mp4", root / f"depth{frames}.npy"
    r = src.render(0, np.arange(frames))
    write_video(video, r["left"], fps=24.0)
    np.save(depth, 1.0 / (r["disparity"].astype(np.float32) + 1.0))
    return video, depth


def _child(video: str, depth: str, warm_video: str, warm_depth: str, checkpoint: str, out: str) -> None:
    """One conversion in a fresh process, after a warm-up conversion of a short clip (first-call costs:
    kernel compilation, allocator growth); prints its report with the process's peak RSS."""
    from lightning_m2s.bench import peak_rss_mb
    from lightning_m2s.convert import convert
    from lightning_m2s.modules import load_refiner

    model, _ = load_refiner(checkpoint)
    kw = dict(model=model, format="sbs", chunk_frames=CHUNK, overlap_frames=OVERLAP, progress=False)
    convert(warm_video, None, out, depth=warm_depth, **kw)
    report = convert(video, None, out, depth=depth, **kw)
    report["peak_rss_mb"] = peak_rss_mb()
    print(json.dumps(report))


def _run_child(video: Path, depth: Path, warm: tuple[Path, Path], checkpoint: Path, out: Path) -> dict:
    code = "import sys; from lightning_m2s.benchmarks.convert import _child; _child(*sys.argv[1:])"
    args = [str(video), str(depth), str(warm[0]), str(warm[1]), str(checkpoint), str(out)]
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"convert benchmark child failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


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
    disparity = normalised_disparity(inv, (float(inv.min()), float(inv.max())), int(0.05 * SIZE))
    warped, holes = forward_splat(left, disparity)
    mask = close_mask(holes, 3)
    whole = lambda: model.decode(refine_latent(model, left, warped, mask, steps=steps), 8)  # noqa: E731
    with torch.no_grad():
        cond = model.build_conditioning(left[None], warped[None], mask[None, :, None], fps_id=24, cond_aug=0.02)
    denoise = lambda: model.predict_one_step(cond) if steps == 1 else model.sample(cond, steps)  # noqa: E731
    with torch.no_grad():
        return best_time(whole, repeats=repeats, warmup=1), best_time(denoise, repeats=repeats, warmup=1)


def run(quick: bool = False) -> dict:
    lengths = (24, 72) if quick else (100, 300)
    result: dict = {"size": SIZE, "chunk_frames": CHUNK, "overlap_frames": OVERLAP, "format": "sbs"}
    with tempfile.TemporaryDirectory(prefix="m2s-bench-convert-") as tmp:
        root = Path(tmp)
        given = os.environ.get("M2S_BENCH_CHECKPOINT")
        checkpoint = Path(given) if given else _write_checkpoint(root / "model.ckpt")
        result["checkpoint"] = given or "untrained debug module"
        warm = _write_video(root, CHUNK + OVERLAP + 4)  # two chunks
        for n in lengths:
            video, depth = _write_video(root, n)
            rep = _run_child(video, depth, warm, checkpoint, root / f"out{n}.mp4")
            result[f"frames_per_second_{n}"] = round(rep["frames_per_second"], 3)
            result[f"seconds_{n}"] = round(rep["seconds"], 2)
            result[f"peak_rss_mb_{n}"] = round(rep["peak_rss_mb"], 1)
            result[f"chunks_{n}"] = rep["chunks"]
            result[f"boundary_jump_{n}"] = round(rep["boundary_jump"], 4)
            result[f"within_chunk_jump_{n}"] = round(rep["within_chunk_jump"], 4)
            result[f"input_boundary_jump_{n}"] = round(rep["input_boundary_jump"], 4)
            result[f"input_within_jump_{n}"] = round(rep["input_within_jump"], 4)
        a, b = lengths
        result["peak_rss_growth_mb"] = round(result[f"peak_rss_mb_{b}"] - result[f"peak_rss_mb_{a}"], 1)
        result["peak_rss_ratio"] = round(result[f"peak_rss_mb_{b}"] / result[f"peak_rss_mb_{a}"], 3)
        video, depth = warm
        start = time.perf_counter()
        one, one_denoise = _step_latency(checkpoint, video, depth, steps=1, repeats=3 if quick else 5)
        many, many_denoise = _step_latency(checkpoint, video, depth, steps=25, repeats=1 if quick else 2)
        result["latency_s_1_step"] = round(one, 3)
        result["latency_s_25_steps"] = round(many, 3)
        result["latency_ratio_25_vs_1"] = round(many / one, 2)  # whole clip: encode + steps + decode
        result["denoise_s_1_step"] = round(one_denoise, 4)
        result["denoise_s_25_steps"] = round(many_denoise, 3)
        result["denoise_ratio_25_vs_1"] = round(many_denoise / one_denoise, 2)  # the UNet part alone
        result["latency_clip"] = f"{CHUNK}x{SIZE}x{SIZE}"
        result["latency_bench_seconds"] = round(time.perf_counter() - start, 1)
    return result
