"""Figures of the sweeps' runs: per-arm bars, Table 9's latency, Table 10's steps curves, the qualitative
frames and the paired differences. Each returns a matplotlib Figure made outside pyplot."""

from __future__ import annotations

import numpy as np
import pandas as pd

from lightning_m2s import paper_results
from lightning_m2s.analysis import grids
from lightning_m2s.analysis.grids import ordered
from lightning_m2s.analysis.runs import FLOOR_PREFIX, NO_DATASET, STEPS_MARK, load_qualitative, split_by_steps
from lightning_m2s.analysis.tables import DATASET_ORDER, QUALITY, metric_header
from lightning_m2s.comparison import colors
from lightning_m2s.evaluation import FLOORS

STEP_COUNTS = (1, 5, 25)  # the inference steps of Table 10


def _arms(runs: pd.DataFrame, ablation: str) -> list[str]:
    """The arms of the grid found in `runs`, in the grid's order; arms not in the sweep file after, by name."""
    found = runs.loc[runs.ablation == ablation, "arm"].unique()
    known = grids.arms(ablation)
    # an arm tested at several step counts is one bar per count ("A_B_standard @ 25"), after its name
    split = {a: sorted((f for f in found if f.startswith(f"{a}{STEPS_MARK}")), key=lambda f: int(f.split()[-1]))
             for a in known}
    ordered_arms = [b for a in known for b in (split[a] or [a])]
    return ordered_arms + sorted(a for a in found if a not in ordered_arms)


def arm_colors(arms) -> dict[str, str]:
    """comparison.colors for the notebook's arm names: an arm split by step count keeps its arm's colour."""
    base = {a: a.split(STEPS_MARK)[0] for a in arms}
    palette = colors(list(dict.fromkeys(base.values())))
    return {a: palette.get(b, "0.5") for a, b in base.items()}


def _bars(ax, runs: pd.DataFrame, arms: list[str], labels: list[str] | None = None) -> None:
    """Per arm: the mean over seeds as a marker with the std as its error bar, each seed as a dot, in the arm's
    colour; the axis fits the values (bars from 0 would flatten every difference); 'missing' where no run."""
    palette = arm_colors(arms)
    found = runs.value.to_numpy()
    for x, arm in enumerate(arms):
        vals = runs.loc[runs.arm == arm, "value"].to_numpy()
        if len(vals) == 0:
            y = np.nanmean(found) if len(found) else 0.5
            ax.text(x, y, "missing", rotation=90, ha="center", va="center", fontsize=8, color="0.4")
            continue
        ax.errorbar(x, vals.mean(), yerr=vals.std(ddof=1) if len(vals) > 1 else None, fmt="s", ms=8,
                    color=palette[arm], capsize=4)
        ax.plot(np.full(len(vals), x), vals, "k.", ms=3)
    ax.set_xlim(-0.6, len(arms) - 0.4)
    ax.margins(y=0.2)
    ax.set_xticks(range(len(arms)), labels or arms, rotation=30, ha="right", fontsize=8)


def _figure(**kwargs):
    """A Figure outside pyplot: nothing keeps it alive, and a notebook shows it once (as the cell's value)."""
    from matplotlib.figure import Figure

    return Figure(layout="constrained", **kwargs)


def _empty(message: str):
    fig = _figure(figsize=(6, 1.2))
    ax = fig.subplots()
    ax.text(0.5, 0.5, message, ha="center", va="center")
    ax.axis("off")
    return fig


def plot_ablation(runs: pd.DataFrame, ablation: str, metrics=QUALITY + ("temporal_error",), region: str = "full"):
    """Each dataset (rows) x metric (columns): one bar per arm, mean over seeds with std and the seeds as dots."""
    sub = split_by_steps(runs[(runs.ablation == ablation) & (runs.region == region) & runs.metric.isin(metrics)])
    if sub.empty:
        return _empty(f"no finished runs in sweep-{ablation}")
    datasets = ordered(sub.dataset.unique(), DATASET_ORDER)
    metrics = [m for m in metrics if m in set(sub.metric)]
    arms = _arms(sub, ablation)
    fig = _figure(figsize=(3 * len(metrics), 2.8 * len(datasets)))
    axes = fig.subplots(len(datasets), len(metrics), squeeze=False)
    for r, d in enumerate(datasets):
        for c, m in enumerate(metrics):
            _bars(axes[r, c], sub[(sub.dataset == d) & (sub.metric == m)], arms)
            axes[r, c].set_title(f"{d}: {metric_header(m)}" + ("" if region == "full" else f", {region} the mask"),
                                 fontsize=9)
    fig.suptitle(f"sweep-{ablation}: mean over seeds (std bars, one dot per seed); the axes fit the values, not 0")
    return fig


def _steps_curves(ax, sub: pd.DataFrame, palette: dict) -> None:
    """One dataset's LPIPS (`sub`) against steps per training regime, and the grid's floors as level lines."""
    for regime, label in (("standard", "sampled t (standard)"), ("end_to_end", "fixed t=T (Eq. 5)")):
        pts = []
        for steps in STEP_COUNTS:
            vals = sub[(sub.arm == regime) & (sub.steps == steps)].value
            if len(vals):
                pts.append((steps, vals.mean(), vals.std(ddof=1) if len(vals) > 1 else 0.0))
        if pts:
            x, y, e = zip(*pts)
            ax.errorbar(x, y, yerr=e, marker="o", capsize=3, color=palette[regime], label=label)
    for floor in (f"{FLOOR_PREFIX}{f}" for f in FLOORS):  # no steps: a level line each
        vals = sub[sub.arm == floor].value
        if len(vals):
            ax.axhline(vals.mean(), ls=":", color=palette[floor], label=floor)


def plot_inference_steps(runs: pd.DataFrame, paper: pd.DataFrame | None = None):
    """Table 10: LPIPS against inference steps, standard vs end-to-end training; the paper's in its own panel."""
    paper = paper_results.frame() if paper is None else paper
    sub = runs[(runs.ablation == "inference_steps") & (runs.metric == "lpips") & (runs.region == "full")]
    datasets = ordered(sub.dataset.unique(), DATASET_ORDER)
    fig = _figure(figsize=(4 * (len(datasets) + 1), 3.2))
    axes = fig.subplots(1, len(datasets) + 1, squeeze=False)
    palette = arm_colors(list(grids.arms("inference_steps")) + [f"{FLOOR_PREFIX}{f}" for f in FLOORS])
    for ax, d in zip(axes[0], datasets):
        _steps_curves(ax, sub[sub.dataset == d], palette)
        ax.set_title(f"ours: {d}", fontsize=9)
    paper10 = paper[paper.table == "10"]
    ax = axes[0, -1]
    for regime, row in (("standard", "sampled t"), ("end_to_end", "fixed t=T")):
        for d, style, marker in (("stereo4d", "-", "o"), ("ego4d", "--", "s")):
            pts = paper10[(paper10.row == row) & (paper10.dataset == d)].sort_values("steps")
            ax.plot(pts.steps, pts.value, style, marker=marker, color=palette[regime], label=f"{row}, {d}")
    ax.set_title("paper (Table 10)", fontsize=9)
    for ax in axes[0]:
        ax.set_xscale("log")
        ax.set_xticks(STEP_COUNTS, [str(n) for n in STEP_COUNTS])
        ax.set_xlabel("inference steps")
        ax.set_ylabel("LPIPS ↓ (lower is better)")
        ax.legend(fontsize=7)
    found = set(zip(sub.arm, sub.steps))
    missing = [f"{a} at {n} step{'s' if n > 1 else ''}" for a in grids.arms("inference_steps") for n in STEP_COUNTS
               if (a, float(n)) not in found]
    if not datasets:
        fig.suptitle("no finished runs in sweep-inference_steps: only the paper's curves")
    elif missing:
        fig.suptitle(f"missing (no finished run): {', '.join(missing)}", fontsize=9)
    return fig


def plot_latency(runs: pd.DataFrame, paper: pd.DataFrame | None = None):
    """Table 9: seconds per 16-frame clip with and without full attention, ours (when the runtime grid has
    finished runs) beside the paper's (A100)."""
    paper = paper_results.frame() if paper is None else paper
    arms = list(grids.arms("runtime"))
    palette = arm_colors(arms)
    sub = runs[(runs.ablation == "runtime") & (runs.metric == "latency_s")]
    fig = _figure(figsize=(7 if len(sub) else 3.8, 3.2))
    axes = fig.subplots(1, 2 if len(sub) else 1, squeeze=False)[0]
    if len(sub):
        _bars(axes[0], sub, arms, ["without", "with"])
        axes[0].set_title("ours (this machine)", fontsize=9)
    theirs = axes[-1]
    paper9 = paper[paper.table == "9"].set_index("row").value
    for x, arm in enumerate(arms):
        value = paper9["without full attention" if arm.startswith("without") else "with full attention"]
        theirs.plot(x, value, "s", ms=8, color=palette[arm])
    theirs.set_xlim(-0.6, 1.6)
    theirs.margins(y=0.3)
    theirs.set_xticks([0, 1], ["without", "with"])
    theirs.set_title("paper (A100, 512x512, 16 frames)", fontsize=9)
    for ax in axes:
        ax.set_ylabel("latency (s) ↓")
        ax.set_xlabel("full attention at disoccluded pixels")
    return fig


def _qualitative_panels(sub: pd.DataFrame, arms: list[str], datasets, tracking_uri: str | None) -> dict:
    """(dataset, arm) -> the qualitative arrays of the arm's lowest-seed run that logged them."""
    panels = {}
    for d in datasets:
        for arm in arms:
            mine = sub[sub.arm == arm].sort_values("seed", key=lambda s: pd.to_numeric(s, errors="coerce"))
            for run_id in mine.run_id.unique():
                data = load_qualitative(tracking_uri, run_id, d)
                if data is not None:
                    panels[d, arm] = data
                    break
    return panels


def plot_qualitative(runs: pd.DataFrame, ablation: str, tracking_uri: str | None = None, datasets=None):
    """Per dataset (rows): left, warped, mask, each arm's output (lowest seed's run), ground truth right."""
    sub = runs[runs.ablation == ablation]
    if sub.empty:
        return _empty(f"no finished runs in sweep-{ablation}")
    datasets = datasets or ordered([d for d in sub.dataset.unique() if d != NO_DATASET], DATASET_ORDER)
    arms = [a for a in _arms(runs, ablation) if not a.startswith(FLOOR_PREFIX)]  # floors log no frames
    panels = _qualitative_panels(sub, arms, datasets, tracking_uri)
    columns = ["left", "warped", "mask"] + arms + ["right (ground truth)"]
    fig = _figure(figsize=(1.8 * len(columns), 2.0 * len(datasets)))
    axes = fig.subplots(len(datasets), len(columns), squeeze=False)
    for r, d in enumerate(datasets):
        inputs = next((panels[d, a] for a in arms if (d, a) in panels), {})  # the same clip for every arm
        images = [inputs.get("left"), inputs.get("warped"), inputs.get("mask")]
        images += [panels[d, a]["output"] if (d, a) in panels else None for a in arms]
        images += [inputs.get("right")]
        for c, (ax, image) in enumerate(zip(axes[r], images)):
            if image is None:
                ax.text(0.5, 0.5, "missing", ha="center", va="center", color="0.4", transform=ax.transAxes)
            elif image.ndim == 2:  # the mask, (H, W)
                ax.imshow(image > 0, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            else:  # a frame, (H, W, 3)
                ax.imshow(image, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(columns[c], fontsize=8)
        axes[r, 0].set_ylabel(d)
    fig.suptitle(f"sweep-{ablation}: middle frame of clip 0")
    return fig


def plot_differences(diffs: pd.DataFrame, ablation: str, metrics=("psnr", "lpips")):
    """Each test set x metric: every comparison's mean paired difference with its 95% interval (0 marked)."""
    sub = diffs[(diffs.ablation == ablation) & diffs.metric.isin(metrics)]
    if sub.empty:
        return _empty(f"no paired differences logged for sweep-{ablation} yet")
    several = sub.experiment.nunique() > 1
    sub = sub.assign(label=sub.arm + " − " + sub.against + ((" (" + sub.experiment + ")") if several else ""))
    sub = sub.drop_duplicates(["label", "dataset", "metric"])  # treatment − reference, each once
    datasets = ordered(sub.dataset.unique(), DATASET_ORDER)
    labels = list(dict.fromkeys(sub.label))
    palette = arm_colors(list(dict.fromkeys(list(grids.arms(ablation)) + list(sub.arm))))
    fig = _figure(figsize=(4 * len(metrics), 0.5 * len(labels) * len(datasets) + 1.2))
    axes = fig.subplots(len(datasets), len(metrics), squeeze=False)
    for r, d in enumerate(datasets):
        for c, m in enumerate(metrics):
            ax = axes[r, c]
            pts = sub[(sub.dataset == d) & (sub.metric == m)].set_index("label").reindex(labels)
            for y, (label, pt) in enumerate(pts.iterrows()):
                if pd.notna(pt["mean"]):
                    ax.errorbar(pt["mean"], y, xerr=[[pt["mean"] - pt.lo], [pt.hi - pt["mean"]]], fmt="o", capsize=3,
                                color=palette.get(pt.arm, "0.3"))
            ax.axvline(0, color="0.5", lw=0.8)
            ax.set_yticks(np.arange(len(labels)), labels, fontsize=8)
            ax.set_title(f"{d}: {metric_header(m, delta=True)}", fontsize=9)
    seeds = int(sub.seeds.max())
    fig.suptitle(f"sweep-{ablation}: treatment − reference, paired, 95% bootstrap interval over clips"
                 f"{' and seeds' if seeds > 1 else ' (1 seed: training noise not covered)'}", fontsize=9)
    return fig
