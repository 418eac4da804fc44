"""A grid's answer on its MLflow parent run: the comparison as tables, and one summary figure.

The same numbers as the printed table (lightning_m2s.comparison), as artifacts the MLflow UI shows on the
parent run: `comparison/means.json` and `comparison/differences.json` (`mlflow.log_table`), and
`comparison/summary.png`: per test set, each arm's mean PSNR and LPIPS with its 95% bootstrap interval
(over clips, and seeds when there are several) beside the floors as lines; below, the qualitative grid
(the middle frame of test clip 0: left, warped, mask, each arm's output, ground truth).
"""

from __future__ import annotations

import numpy as np

from lightning_m2s import comparison
from lightning_m2s.stats import paired_difference, per_clip_matrix

FIGURE_METRICS = ("psnr", "lpips")
BETTER = {"psnr": "higher is better", "lpips": "lower is better"}


def log_summary(client, run_id: str, summary: dict, tracking_uri: str | None = None) -> None:
    c = summary["comparison"]
    client.log_table(run_id, comparison.mean_table(c["means"], c["datasets"]), "comparison/means.json")
    if c["differences"]:
        client.log_table(run_id, comparison.difference_table(c["differences"]), "comparison/differences.json")
    client.log_figure(run_id, summary_figure(summary, qualitative(summary, tracking_uri)), "comparison/summary.png")


def arm_interval(runs: list[list[dict]], dataset: str, metric: str) -> tuple[float, float, float] | None:
    """An arm's mean over clips (and seeds) with its 95% bootstrap interval, or None without clips."""
    values, clips = per_clip_matrix(runs, dataset, metric)
    if not clips:
        return None
    d = paired_difference(values, np.zeros((1, len(clips))))  # the mean itself: the difference from 0
    return (d.mean, d.lo, d.hi) if np.isfinite(d.mean) else None


def qualitative(summary: dict, tracking_uri: str | None) -> dict[tuple[str, str], dict]:
    """(dataset, arm) -> the middle-frame arrays of the arm's lowest-seed finished run."""
    from lightning_m2s.analysis import load_qualitative

    panels = {}
    done = sorted((r for r in summary["trials"] if r["state"] == "COMPLETE" and r.get("run_id")),
                  key=lambda r: (r["seed"] is None, r["seed"]))
    for dataset in summary["comparison"]["datasets"]:
        for arm in summary["per_clip"]["arms"]:
            run = next((r for r in done if r["arm"] == arm), None)
            data = load_qualitative(tracking_uri, run["run_id"], dataset) if run else None
            if data is not None:
                panels[dataset, arm] = data
    return panels


def summary_figure(summary: dict, panels: dict[tuple[str, str], dict]):
    from matplotlib.figure import Figure

    c, arms = summary["comparison"], summary["per_clip"]["arms"]
    datasets, floors = c["datasets"], [r for r in c["means"] if r["kind"] == "floor"]
    columns = ["left", "warped", "mask", *arms, "right (ground truth)"]
    width = max(3.0 * len(datasets) * len(FIGURE_METRICS), 1.6 * len(columns))
    fig = Figure(figsize=(width, 3.2 + 1.8 * len(datasets)), layout="constrained")
    top, bottom = fig.subfigures(2, 1, height_ratios=[3.2, 1.8 * len(datasets)])
    axes = top.subplots(1, len(datasets) * len(FIGURE_METRICS), squeeze=False)[0]
    for ax, (dataset, metric) in zip(axes, [(d, m) for d in datasets for m in FIGURE_METRICS]):
        for x, arm in enumerate(arms):
            found = arm_interval(arms[arm], dataset, metric)
            if found is None:
                continue
            mean, lo, hi = found
            ax.bar(x, mean, yerr=[[mean - lo], [hi - mean]], color=f"C{x}", alpha=0.8, capsize=4)
        for k, floor in enumerate(floors):
            value = floor.get(f"{dataset}/{metric}")
            if value is not None and np.isfinite(value):
                ax.axhline(value, ls="--", color=f"C{len(arms) + k}", label=f"floor: {floor['name']}")
        ax.set_xticks(range(len(arms)), list(arms), rotation=20, ha="right", fontsize=8)
        ax.set_title(f"{dataset}: {comparison.LABELS[metric]} ({BETTER[metric]})", fontsize=9)
        ax.legend(fontsize=7)
    top.suptitle(f"{summary['study']}: mean over test clips, 95% bootstrap interval; floors dashed", fontsize=10)
    grid = bottom.subplots(len(datasets), len(columns), squeeze=False)
    for r, dataset in enumerate(datasets):
        inputs = next((panels[dataset, a] for a in arms if (dataset, a) in panels), {})  # the same clip for every arm
        images = [inputs.get("left"), inputs.get("warped"), inputs.get("mask")]
        images += [panels[dataset, a]["output"] if (dataset, a) in panels else None for a in arms]
        images.append(inputs.get("right"))
        for k, (ax, image) in enumerate(zip(grid[r], images)):
            if image is None:
                ax.text(0.5, 0.5, "missing", ha="center", va="center", color="0.4", transform=ax.transAxes)
            else:
                ax.imshow(image > 0 if image.ndim == 2 else image, cmap="gray", interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(columns[k], fontsize=8)
        grid[r, 0].set_ylabel(dataset)
    return fig
