"""`m2s bench step`: what candidate speed-ups and VAE layouts cost the end-to-end fine-tune step of the
embedded default (the tiny experiment, without full attention as the left_cond grid; one batch per bucket,
each step timed best of 3 after a warm-up). Ratios above 1 mean the candidate is slower.

1. bf16 autocast (`model.autocast_dtype=bfloat16`) against fp32, with whether the CPU has native bf16.
2. The step's three VAE encodes (left, warped, right) as three calls against one call over the three
   videos stacked.
3. VAE layouts (random weights, the same UNet): the shipped 2x downscale with 12 latent channels against
   no downscale (1x) with 4 or 12: the UNet then runs on the frame's own grid.
"""

from __future__ import annotations

from pathlib import Path

import torch

from lightning_m2s.bench import best_time
from lightning_m2s.benchmarks.train import bucket_batches, train_step
from lightning_m2s.config import load_config

VAE_LAYOUTS = {  # name -> the `model.vae` config keys
    "2x_12ch": {"block_out_channels": [64, 64], "latent_channels": 12},  # shipped
    "1x_4ch": {"block_out_channels": [64], "latent_channels": 4},
    "1x_12ch": {"block_out_channels": [64], "latent_channels": 12},
}


def native_bf16() -> bool:
    """Whether the CPU computes bfloat16 natively (avx512_bf16 / amx_bf16); without, oneDNN emulates it."""
    cpuinfo = Path("/proc/cpuinfo")
    flags = cpuinfo.read_text() if cpuinfo.is_file() else ""
    return "avx512_bf16" in flags or "amx_bf16" in flags


def step_seconds(overrides: list[str], batches: list, repeats: int) -> tuple[float, object]:
    """Mean over the batches of the best end-to-end step time, and the module, for tiny + `overrides`."""
    from lightning_m2s.train import build_module

    module = build_module(load_config("tiny", ["model.full_attention=false", *overrides])).train()
    optimizer = module.configure_optimizers()
    seconds = sum(best_time(lambda: train_step(module, optimizer, b), repeats) for b in batches) / len(batches)
    return seconds, module


def run(quick: bool = False) -> dict:
    repeats = 1 if quick else 3
    batches = list(bucket_batches(load_config("tiny")).values())
    if quick:
        batches = batches[-1:]
    fp32, module = step_seconds([], batches, repeats)
    bf16, _ = step_seconds(["model.autocast_dtype=bfloat16"], batches, repeats)

    vae = module.model.vae
    three = sum(best_time(lambda: [vae.encode(v) for v in (b.left, b.warped, b.right)], repeats) for b in batches)
    stacked = sum(best_time(lambda: vae.encode(torch.cat([b.left, b.warped, b.right])), repeats) for b in batches)

    layouts = {}
    for name, vae_cfg in VAE_LAYOUTS.items():
        keys = [f"model.vae.{k}={v}".replace(" ", "") for k, v in vae_cfg.items()]
        layouts[name], _ = step_seconds(["model.pretrained=null", *keys], batches, repeats)
    return {
        "native_bf16": native_bf16(),
        "fp32_s_per_step": round(fp32, 3),
        "bf16_s_per_step": round(bf16, 3),
        "bf16_over_fp32": round(bf16 / fp32, 2),
        "encodes_three_calls_s": round(three / len(batches), 3),
        "encodes_one_call_s": round(stacked / len(batches), 3),
        "one_call_over_three": round(stacked / three, 2),
        "layout_s_per_step": {k: round(v, 3) for k, v in layouts.items()},
        "layout_over_shipped": {k: round(v / layouts["2x_12ch"], 2) for k, v in layouts.items()},
    }
