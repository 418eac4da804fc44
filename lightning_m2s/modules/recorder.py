"""The bookkeeping of one evaluation pass (validation or test), apart from any LightningModule.

    recorder.start("test", datasets, step_counts, device)
    recorder.record(batch, pred, steps, seconds)          # per batch and step count
    values, latencies = recorder.finish()                 # the logged numbers; per_clip rows after a test pass

One StereoMetrics per (dataset, step count), the clip ids in update order (per-clip rows pair clips across
runs), seconds per 16-frame clip, and the first clips per dataset as previews (callbacks.MediaLogger).
"""

from __future__ import annotations

from typing import Any

import torch

from lightning_m2s.data.clip import StereoClip
from lightning_m2s.metrics import StereoMetrics

DATASET_NAMES = {"image_pairs": "real"}  # evaluation dataset names in metric keys: sources by what they are


def dataset_name(meta: dict) -> str:
    return DATASET_NAMES.get(meta.get("source", "unknown"), meta.get("source", "unknown"))


def clip_id(meta: dict) -> str:
    """A test clip's identity, the key that pairs clips across runs: video and first frame."""
    return f"{meta.get('video')}@{meta.get('start_frame')}"


class EvaluationRecorder:
    def __init__(self, lpips_net: str | None, ms_ssim: str, preview_clips: int):
        self.lpips_net, self.ms_ssim, self.preview_clips = lpips_net, ms_ssim, preview_clips
        self.stage, self.step_counts = "val", [1]
        self.metrics: dict[tuple[str, int], StereoMetrics] = {}  # (dataset, steps) -> metric
        self.clip_ids: dict[tuple[str, int], list[str]] = {}  # (dataset, steps) -> clip ids in update order
        self.latencies: dict[int, list[float]] = {}  # steps -> seconds per 16-frame clip
        self.previews: list[dict[str, Any]] = []  # the first clips per dataset of the last pass
        self.per_clip: list[dict[str, Any]] = []  # the last test pass at the first step count: one row per clip
        self.per_clip_by_steps: dict[int, list[dict[str, Any]]] = {}  # every step count's rows (several only)
        self.device = torch.device("cpu")

    def start(self, stage: str, datasets: list[str], step_counts: list[int], device: torch.device) -> None:
        """A new pass. Its metrics exist before any batch, in one order on every rank: each compute() is a
        collective under DDP, so all ranks must call them alike."""
        self.stage, self.step_counts, self.device = stage, step_counts, device
        self.metrics.clear()
        self.clip_ids.clear()
        self.latencies.clear()
        self.previews.clear()
        for dataset in datasets:
            for steps in step_counts:
                self._metric(dataset, steps)

    def _metric(self, dataset: str, steps: int) -> StereoMetrics:
        if (dataset, steps) not in self.metrics:
            self.metrics[dataset, steps] = StereoMetrics(lpips_net=self.lpips_net, ms_ssim_mode=self.ms_ssim).to(self.device)
        return self.metrics[dataset, steps]

    def record(self, batch: StereoClip, pred: torch.Tensor, steps: int, seconds: float) -> None:
        """Score `pred` [B, T, 3, H, W] against the batch's right view, predicted in `seconds`."""
        B, T = batch.left.shape[:2]
        self.latencies.setdefault(steps, []).append(seconds / B * 16 / T)  # per 16-frame clip
        for i, meta in enumerate(batch.meta):
            if meta.get("padding"):  # a DDP rank's filler: scored on the rank that owns the clip
                continue
            dataset = dataset_name(meta)
            self._metric(dataset, steps).update(pred[i : i + 1], batch.right[i : i + 1], batch.mask[i : i + 1])
            self.clip_ids.setdefault((dataset, steps), []).append(clip_id(meta))
            shown = sum(p["dataset"] == dataset for p in self.previews)
            if steps == self.step_counts[0] and shown < self.preview_clips:
                self.previews.append({
                    "dataset": dataset, "left": batch.left[i].cpu(), "warped": batch.warped[i].cpu(),
                    "mask": batch.mask[i].cpu(), "output": pred[i].cpu(), "right": batch.right[i].cpu(),
                })

    def finish(self) -> tuple[dict[str, float], dict[str, float]]:
        """(metric values, reduced over DDP ranks already; mean latencies of this rank) of the pass, keyed
        `<stage>/<dataset>/<metric>` for the first step count and, with several, `.../steps<N>/...` each."""
        values = {}
        for (dataset, steps), metric in sorted(self.metrics.items()):
            if metric.update_count == 0 and not torch.distributed.is_initialized():
                continue  # a dataset this pass never reached (e.g. limit_test_batches): nothing to report
            computed = metric.compute()  # gathered over DDP ranks
            if computed["n_videos"] == 0:
                continue
            for prefix in self._prefixes(dataset, steps):
                values.update({f"{prefix}/{name}": float(v) for name, v in computed.items()
                               if not name.startswith("n_videos")})
        latencies = {}
        for steps, seconds in self.latencies.items():
            for prefix in self._prefixes(None, steps):
                latencies[f"{prefix}/latency_s"] = sum(seconds) / len(seconds)
        if self.stage == "test":
            by_steps = {steps: self._per_clip_rows(steps) for steps in self.step_counts}
            self.per_clip = by_steps[self.step_counts[0]]
            self.per_clip_by_steps = by_steps if len(by_steps) > 1 else {}
        return values, latencies

    def _prefixes(self, dataset: str | None, steps: int) -> list[str]:
        """`<stage>[/<dataset>]` for the first step count (what sweeps' objectives read) and, with several
        step counts, `<stage>[/<dataset>]/steps<N>` for each."""
        head = self.stage if dataset is None else f"{self.stage}/{dataset}"
        names = [head] if steps == self.step_counts[0] else []
        return names + ([f"{head}/steps{steps}"] if len(self.step_counts) > 1 else [])

    def _per_clip_rows(self, steps: int) -> list[dict[str, Any]]:
        """One row per scored test clip at `steps`: {dataset, clip, <metric>: value}, gathered over DDP
        ranks, sorted."""
        rows = []
        for (dataset, n), metric in sorted(self.metrics.items()):
            if n != steps:
                continue
            values = metric.per_video()  # this rank's videos, in update order
            for j, cid in enumerate(self.clip_ids.get((dataset, n), [])):
                rows.append({"dataset": dataset, "clip": cid, **{name: v[j] for name, v in values.items()}})
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, rows)
            rows = [row for part in gathered for row in part]
        return sorted(rows, key=lambda r: (r["dataset"], r["clip"]))
