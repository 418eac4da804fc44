"""`m2s bench train`: training steps per second of each variant on the embedded default's buckets, and
the train loader's samples per second beside it (the loader must deliver >= 3x the step rate).

Each variant is built from the tiny experiment (random tiny VAE: the same compute as the trained one)
and takes one step per bucket with the real loss, backward and AdamW update, after one warm-up step. The loader is the real train dataloader of the same experiment with its 2 workers.
"""

from __future__ import annotations

import time

import torch

from lightning_m2s.bench import peak_rss_mb
from lightning_m2s.benchmarks.data import _rate
from lightning_m2s.config import load_config, to_container
from lightning_m2s.data.buckets import SampleKey, parse_buckets
from lightning_m2s.data.clip import collate_clips
from lightning_m2s.data.datamodule import StereoDataModule

VARIANTS = ("end_to_end", "latent_only", "standard_diffusion")


def train_step(module, optimizer, batch) -> None:
    """One real optimisation step: the variant's loss, backward, update."""
    loss, _ = module.compute_loss(batch)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def bucket_batches(cfg) -> dict:
    """One training batch per bucket of the experiment `cfg`: {Bucket: StereoClip}."""
    data_cfg = to_container(cfg.data)
    dataset = StereoDataModule(**data_cfg).dataset("train")
    buckets = parse_buckets(data_cfg["buckets"] or StereoDataModule().buckets)
    return {b: collate_clips([dataset[SampleKey(i, b.frames, b.height, b.width, i)] for i in range(data_cfg["batch_size"])])
            for b in buckets}


def run(quick: bool = False) -> dict:
    cfg = load_config("tiny")
    data_cfg = to_container(cfg.data)
    batches = bucket_batches(cfg)
    buckets = list(batches)
    batch_size = data_cfg["batch_size"]
    result: dict = {"batch_size": batch_size, "threads": torch.get_num_threads()}
    from lightning_m2s.train import build_module

    for variant in VARIANTS:
        cfg.module.variant = variant
        module = build_module(cfg).train()
        optimizer = module.configure_optimizers()

        train_step(module, optimizer, batches[buckets[0]])  # warm-up: allocations, LPIPS weights
        seconds = {}
        for b, batch in batches.items():  # one timed step per bucket keeps the whole run under a minute
            start = time.perf_counter()
            train_step(module, optimizer, batch)
            seconds[f"{b.frames}x{b.height}"] = time.perf_counter() - start
        mean = sum(seconds.values()) / len(seconds)  # buckets are equally likely
        result[variant] = {
            "steps_per_s": round(1 / mean, 3),
            **{f"s_per_step_{k}": round(v, 3) for k, v in seconds.items()},
            "peak_rss_mb_after": round(peak_rss_mb(), 1),
        }
        del module, optimizer
    samples_per_s, _ = _rate(data_cfg["buckets"] or StereoDataModule().buckets, 4 if quick else 12)
    result["loader_samples_per_s"] = round(samples_per_s, 2)
    fastest = max(result[v]["steps_per_s"] for v in VARIANTS)
    result["loader_over_fastest_step_rate"] = round(samples_per_s / fastest, 2)
    result["loader_samples_over_needed"] = round(samples_per_s / (fastest * batch_size), 2)
    return result
