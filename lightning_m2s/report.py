"""A grid's answer on its MLflow parent run: the comparison as tables, and one summary figure.

The same numbers as the printed table (lightning_m2s.comparison), as artifacts the MLflow UI shows on the
parent run: `comparison/means.json` and `comparison/differences.json` (`mlflow.log_table`), and
`comparison/summary.png`: per test set, each arm's mean PSNR and LPIPS with its 95% bootstrap interval
(over clips, and seeds when there are several) beside the floors as lines; below, the qualitative grid
(the middle frame of test clip 0: left, warped, mask, each arm's output, ground truth).
"""

from __future__ import annotations

import time

import numpy as np

from lightning_m2s import comparison, tags, tracking
from lightning_m2s.stats import paired_difference, per_clip_matrix

FIGURE_METRICS = ("psnr", "lpips")
BETTER = {"psnr": "higher is better", "lpips": "lower is better"}


def log_summary(client, run_id: str, summary, tracking_uri: str | None = None) -> None:
    """The comparison tables and summary.png on a sweep's parent run (summary: a sweep.SweepResult)."""
    c = summary.comparison
    client.log_table(run_id, comparison.mean_table(c["means"], c["datasets"]), "comparison/means.json")
    if c["differences"]:
        client.log_table(run_id, comparison.difference_table(c["differences"]), "comparison/differences.json")
    client.log_figure(run_id, summary_figure(summary, qualitative(summary, tracking_uri)), "comparison/summary.png")
    arms = list(dict.fromkeys([*summary.per_clip["arms"], *(t.arm for t in summary.trials)]))
    client.set_tag(run_id, tags.ARMS, ",".join(arms))  # the grid's order: the colours follow its reference arm
    log_answer_runs(client, run_id)


def arm_order(run_tags: dict, found: list[str]) -> list[str]:
    """A grid's arms in its sweep file's order (the parent's m2s.arms tag; for a sweep logged before that tag,
    its sweeps/ file when there still is one), then any other arm found."""
    listed = [a for a in run_tags.get(tags.ARMS, "").split(",") if a]
    if not listed and run_tags.get(tags.ABLATION):
        from lightning_m2s.errors import ConfigError
        from lightning_m2s.sweep import load_sweep

        try:
            listed = list(load_sweep(run_tags[tags.ABLATION]).arms)
        except ConfigError:  # a sweep file since renamed or a YAML path elsewhere: the order found
            pass
    return list(dict.fromkeys([a for a in listed if a in found] + [a for a in found if a]))


def log_answer_runs(client, parent_id: str) -> dict[str, list]:
    """What the MLflow UI needs to show a grid's answer: the floors as runs of the sweep beside its trials
    (children of the parent run, named 'floor: <variant>', with the trials' `test/<set>/<metric>` keys, made
    from the parent's `floor/<variant>/...` metrics) and one run colour per arm and floor (the figures').
    Found again, never duplicated, when a sweep finishes again. Returns {"arms": the newest finished trial
    run per arm and seed, reference arm first; "floors": the floor runs}."""
    parent = client.get_run(parent_id)
    parent_tags, exp_id = parent.data.tags, parent.info.experiment_id
    children = client.search_runs([exp_id], filter_string=tags.filter_tag(tags.PARENT_RUN, parent_id),
                                  order_by=["attributes.start_time DESC"], max_results=1000)
    newest = {}
    for run in children:  # a re-run of a point replaces it: the newest finished run counts
        key = (run.data.tags.get(tags.ARM), run.data.tags.get(tags.SEED))
        if run.data.tags.get(tags.KIND) == tags.TRIAL and run.info.status == "FINISHED" and key not in newest:
            newest[key] = run
    arm_names = arm_order(parent_tags, [a for a, _ in newest])
    palette = comparison.colors(arm_names)
    order = [a for a in palette if a in arm_names]  # the reference first, as the colours are given
    arms = sorted(newest.values(), key=lambda r: (order.index(r.data.tags[tags.ARM]), str(r.data.tags.get(tags.SEED))))
    for run in arms:
        if run.data.tags.get(tags.RUN_COLOR) != palette[run.data.tags[tags.ARM]]:
            client.set_tag(run.info.run_id, tags.RUN_COLOR, palette[run.data.tags[tags.ARM]])
    variants = {}
    for key, value in parent.data.metrics.items():
        if key.startswith("floor/"):
            _, variant, metric = key.split("/", 2)
            variants.setdefault(variant, {})[metric] = value
    floors = []
    # the settings the floors were scored with; not the ablation tag, which marks a grid's trained arms
    study_tags = {k: v for k, v in parent_tags.items() if k.startswith((tags.METRICS_PREFIX, tags.EXPERIMENT))}
    known = list(comparison.FLOOR_COLORS)  # warp-only first, as the tables list them
    for variant in sorted(variants, key=lambda v: (known.index(v) if v in known else len(known), v)):
        run = tracking.find_or_create_run(
            client, exp_id, {tags.STUDY: parent_tags.get(tags.STUDY, ""), tags.KIND: tags.FLOOR, tags.FLOOR_VARIANT: variant},
            f"floor: {variant}", {tags.PARENT_RUN: parent_id, **study_tags,
                                   tags.RUN_COLOR: palette.get(variant, "#7f7f7f"),
                                   tags.NOTE: "A training-free floor of the grid, scored on exactly its "
                                                          "test clips (the values are the parent run's floor/... metrics)."})
        new = {k: v for k, v in variants[variant].items() if run.data.metrics.get(k) != v}
        if new:
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            client.log_batch(run.info.run_id, metrics=[Metric(k, v, now, 0) for k, v in new.items()])
        if not client.list_artifacts(run.info.run_id):  # MLflow's compare view fails on a run without any
            tracking.log_json_artifact(client, run.info.run_id, {"floor": variant, "metrics": variants[variant]},
                                       "metrics", "floor.json")
        if run.info.status != "FINISHED":
            client.set_terminated(run.info.run_id, status="FINISHED")
        floors.append(run)
    return {"arms": arms, "floors": floors}


def arm_interval(runs: list[list[dict]], dataset: str, metric: str) -> tuple[float, float, float] | None:
    """An arm's mean over clips (and seeds) with its 95% bootstrap interval, or None without clips."""
    values, clips = per_clip_matrix(runs, dataset, metric)
    if not clips:
        return None
    d = paired_difference(values, np.zeros((1, len(clips))))  # the mean itself: the difference from 0
    return (d.mean, d.lo, d.hi) if np.isfinite(d.mean) else None


def qualitative(summary, tracking_uri: str | None) -> dict[tuple[str, str], dict]:
    """(dataset, arm) -> the middle-frame arrays of the arm's lowest-seed finished run."""
    from lightning_m2s.analysis import load_qualitative

    panels = {}
    done = sorted((t for t in summary.trials if t.state == "COMPLETE" and t.run_id),
                  key=lambda t: (t.seed is None, t.seed))
    for dataset in summary.comparison["datasets"]:
        for arm in summary.per_clip["arms"]:
            run = next((t for t in done if t.arm == arm), None)
            data = load_qualitative(tracking_uri, run.run_id, dataset) if run else None
            if data is not None:
                panels[dataset, arm] = data
    return panels


def summary_figure(summary, panels: dict[tuple[str, str], dict]):
    from matplotlib.figure import Figure

    c, arms = summary.comparison, summary.per_clip["arms"]
    datasets, floors = c["datasets"], [r for r in c["means"] if r["kind"] == "floor"]
    columns = ["left", "warped", "mask", *arms, "right (ground truth)"]
    width = max(3.0 * len(datasets) * len(FIGURE_METRICS), 1.6 * len(columns))
    fig = Figure(figsize=(width, 3.2 + 1.8 * len(datasets)), layout="constrained")
    top, bottom = fig.subfigures(2, 1, height_ratios=[3.2, 1.8 * len(datasets)])
    axes = top.subplots(1, len(datasets) * len(FIGURE_METRICS), squeeze=False)[0]
    palette = comparison.colors(arms)
    for ax, (dataset, metric) in zip(axes, [(d, m) for d in datasets for m in FIGURE_METRICS]):
        # points with intervals, not bars: the axis fits the values (a PSNR bar from 0 flattens every difference)
        for x, arm in enumerate(arms):
            found = arm_interval(arms[arm], dataset, metric)
            if found is None:
                continue
            mean, lo, hi = found
            ax.errorbar(x, mean, yerr=[[mean - lo], [hi - mean]], fmt="o", ms=7, color=palette[arm], capsize=5)
        for floor in floors:
            value = floor.get(f"{dataset}/{metric}")
            if value is not None and np.isfinite(value):
                ax.axhline(value, ls="--", color=palette.get(floor["name"], "0.5"), label=f"floor: {floor['name']}")
        ax.set_xlim(-0.6, len(arms) - 0.4)
        ax.margins(y=0.15)
        ax.set_xticks(range(len(arms)), list(arms), rotation=20, ha="right", fontsize=8)
        unit = comparison.unit(metric)
        ax.set_title(f"{dataset}: {comparison.LABELS[metric]}{f' ({unit})' if unit else ''} {comparison.arrow(metric)} "
                     f"({BETTER[metric]})", fontsize=9)
        ax.legend(fontsize=7)
    top.suptitle(f"{summary.study}: mean over test clips, 95% bootstrap interval; floors dashed", fontsize=10)
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
