"""A grid's comparison: arms and floors side by side, and paired differences with bootstrap intervals.

Used by the sweep's printed table, the parent run's logged table and the notebook, so all three show
the same numbers. Inputs are per-clip test rows (`train.read_per_clip`): for each arm one list of rows
per seed, for each floor one list.
"""

from __future__ import annotations

import math

import numpy as np

from lightning_m2s.stats import paired_difference, per_clip_matrix

TABLE_METRICS = ("psnr", "lpips", "psnr_inside", "lpips_inside")  # per test set in the printed table
DIFF_METRICS = ("psnr", "lpips", "psnr_inside")  # differences with intervals in the printed table
FLOOR_REFERENCE = "classical_fill"  # the floor every arm is compared with
LABELS = {"psnr": "PSNR", "lpips": "LPIPS", "psnr_inside": "PSNR-in", "lpips_inside": "LPIPS-in"}
UNITS = {"psnr": "dB"}  # the others are unitless
HIGHER_IS_BETTER = {"psnr": True, "ms_ssim": True, "lpips": False, "temporal_error": False, "latency_s": False}
# One colour per arm and floor wherever they are drawn (printed figures, notebook, MLflow UI's run colours):
# the floors keep theirs in every grid; the arms take the others in their grid's order.
FLOOR_COLORS = {"warp_only": "#7f7f7f", "classical_fill": "#8c564b"}
ARM_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#17becf", "#bcbd22", "#e377c2")


def base_metric(metric: str) -> str:
    """'psnr_inside' -> 'psnr', 'test/real/lpips' -> 'lpips'."""
    return metric.rsplit("/", 1)[-1].removesuffix("_inside").removesuffix("_outside")


def arrow(metric: str) -> str:
    """'↑' where higher is better, '↓' where lower is."""
    return "↑" if HIGHER_IS_BETTER.get(base_metric(metric), False) else "↓"


def unit(metric: str) -> str:
    return UNITS.get(base_metric(metric), "")


def colors(arms) -> dict[str, str]:
    """Name -> colour for a grid's arms (in order) and the floors. An arm that is a floor's variant (the
    baselines grid) keeps the floor's colour; names may carry the 'floor: ' prefix."""
    out = {f"floor: {name}": color for name, color in FLOOR_COLORS.items()} | dict(FLOOR_COLORS)
    arms = list(dict.fromkeys(arms))
    first = reference_arm(arms)  # the reference first: the same colours whatever order a caller lists them in
    others = [a for a in ([first] if first else []) + arms if a.removeprefix("floor: ") not in FLOOR_COLORS]
    others = list(dict.fromkeys(others))
    for k, arm in enumerate(others):
        out[arm] = ARM_COLORS[k % len(ARM_COLORS)]
    return out


def reference_arm(arms) -> str | None:
    """The arm the grid's other arms are compared with (treatment - reference): `without_<x>` where the
    grid also has `with_<x>` (the arm without the studied component), else the grid's first arm."""
    arms = list(arms)
    for arm in arms:
        if arm.startswith("without_") and f"with_{arm.removeprefix('without_')}" in arms:
            return arm
    return arms[0] if arms else None


def datasets_of(arms: dict[str, list[list[dict]]], floors: dict[str, list[dict]]) -> list[str]:
    names = {r["dataset"] for runs in arms.values() for rows in runs for r in rows}
    names |= {r["dataset"] for rows in floors.values() for r in rows}
    return sorted(names, key=lambda n: (n != "synthetic", n))


def means(arms: dict[str, list[list[dict]]], floors: dict[str, list[dict]], metrics=TABLE_METRICS) -> list[dict]:
    """One row per arm and floor: {name, kind, seeds, <dataset>/<metric>: mean over clips and seeds, <dataset>/clips}."""
    out = []
    entries = [(name, "arm", runs) for name, runs in arms.items()] + [(name, "floor", [rows]) for name, rows in floors.items()]
    for name, kind, runs in entries:
        row = {"name": name, "kind": kind, "seeds": len(runs)}
        for ds in datasets_of(arms, floors):
            for m in metrics:
                values, clips = per_clip_matrix(runs, ds, m)
                row[f"{ds}/{m}"] = float(np.nanmean(values)) if values.size and np.isfinite(values).any() else math.nan
                row[f"{ds}/clips"] = len(clips)
        out.append(row)
    return out


def differences(arms: dict[str, list[list[dict]]], floors: dict[str, list[dict]], reference: str,
                metrics=DIFF_METRICS) -> list[dict]:
    """Paired differences: every other arm minus the reference arm, and every arm minus classical fill,
    per test set and metric: {label, arm, against, dataset, metric, mean, lo, hi, clips, seeds, excludes_zero}."""
    pairs = [(a, reference) for a in arms if a != reference and reference in arms]
    if FLOOR_REFERENCE in floors:
        pairs += [(a, FLOOR_REFERENCE) for a in arms]
    out = []
    for arm, against in pairs:
        for ds in datasets_of(arms, floors):
            for m in metrics:
                base_runs = arms[against] if against in arms else [floors[against]]
                a, clips_a = per_clip_matrix(arms[arm], ds, m)
                b, clips_b = per_clip_matrix(base_runs, ds, m)
                common = sorted(set(clips_a) & set(clips_b))
                if not common:
                    continue
                a = a[:, [clips_a.index(c) for c in common]]
                b = b[:, [clips_b.index(c) for c in common]]
                if b.shape[0] not in (1, a.shape[0]):  # seeds pair only when both have them all
                    b = b.mean(axis=0, keepdims=True)
                d = paired_difference(a, b)
                out.append({"label": f"{arm} - {against}", "arm": arm, "against": against, "dataset": ds, "metric": m,
                            "mean": d.mean, "lo": d.lo, "hi": d.hi, "clips": d.clips, "seeds": d.seeds,
                            "excludes_zero": d.excludes_zero})
    return out


def _num(v: float, digits: int) -> str:
    return "—" if v is None or not math.isfinite(v) else f"{v:.{digits}f}"


def _interval(d: dict) -> str:
    digits = 3 if d["metric"].startswith(("lpips", "ms_ssim")) else 2
    star = "*" if d["excludes_zero"] else " "
    return f"{d['mean']:+.{digits}f} [{d['lo']:+.{digits}f},{d['hi']:+.{digits}f}]{star}"


def format_comparison(mean_rows: list[dict], diff_rows: list[dict], datasets: list[str]) -> str:
    """The printed table (at most 120 columns for two test sets): means per arm and floor, then the
    paired differences with their intervals."""
    name_w = max([len(r["name"]) + (7 if r["kind"] == "floor" else 0) for r in mean_rows] + [10])
    cell = 9
    block = len(TABLE_METRICS) * cell
    lines = [" " * name_w + "".join(f"  {ds} ({mean_rows[0].get(f'{ds}/clips', 0)} clips)".ljust(block + 2) for ds in datasets),
             "arm".ljust(name_w) + "".join("  " + "".join(LABELS[m].rjust(cell) for m in TABLE_METRICS) for _ in datasets)]
    for r in mean_rows:
        name = f"floor: {r['name']}" if r["kind"] == "floor" else r["name"]
        cells = "".join("  " + "".join(_num(r.get(f"{ds}/{m}"), 3 if m.startswith("lpips") else 2).rjust(cell)
                                       for m in TABLE_METRICS) for ds in datasets)
        lines.append(name.ljust(name_w) + cells)
    if diff_rows:
        seeds = max(d["seeds"] for d in diff_rows)
        lines += ["", f"paired differences: mean [95% bootstrap interval over clips{' and seeds' if seeds > 1 else ''}; "
                      f"{seeds} seed{'s' if seeds > 1 else ''}], * = interval excludes 0"]
        labels = list(dict.fromkeys(d["label"] for d in diff_rows))
        cells = {(d["label"], d["dataset"], d["metric"]): _interval(d) for d in diff_rows}
        widths = {m: 2 + max([len("Δ" + LABELS[m])] + [len(c) for k, c in cells.items() if k[2] == m]) for m in DIFF_METRICS}
        lines.append("  " + "set".ljust(10) + "".join(("Δ" + LABELS[m]).rjust(widths[m]) for m in DIFF_METRICS))
        for label in labels:  # the comparison on its own line: arm names of any length fit
            lines.append(label)
            for ds in datasets:
                if any((label, ds, m) in cells for m in DIFF_METRICS):
                    lines.append("  " + ds.ljust(10) + "".join(cells.get((label, ds, m), "—").rjust(widths[m])
                                                           for m in DIFF_METRICS))
    return "\n".join(lines)


def _rounded(v: float, digits: int) -> float | None:
    return None if v is None or not math.isfinite(v) else round(v, digits)


def mean_table(mean_rows: list[dict], datasets: list[str]) -> dict[str, list]:
    """The printed table's means as columns (for `mlflow.log_table`), rounded as printed."""
    cols = {"arm": [f"floor: {r['name']}" if r["kind"] == "floor" else r["name"] for r in mean_rows],
            "seeds": [r["seeds"] for r in mean_rows]}
    for ds in datasets:
        cols[f"{ds} clips"] = [r.get(f"{ds}/clips", 0) for r in mean_rows]
        for m in TABLE_METRICS:
            cols[f"{ds} {LABELS[m]}"] = [_rounded(r.get(f"{ds}/{m}"), 3 if m.startswith("lpips") else 2) for r in mean_rows]
    return cols


def difference_table(diff_rows: list[dict]) -> dict[str, list]:
    """The printed paired differences as columns: one row per comparison, test set and metric, with the
    printed cell (mean [interval], * when it excludes 0) and its numbers."""
    digits = [3 if d["metric"].startswith(("lpips", "ms_ssim")) else 2 for d in diff_rows]
    return {"comparison": [d["label"] for d in diff_rows], "set": [d["dataset"] for d in diff_rows],
            "metric": ["Δ" + LABELS.get(d["metric"], d["metric"]) for d in diff_rows],
            "printed": [_interval(d) for d in diff_rows],
            "mean": [_rounded(d["mean"], n) for d, n in zip(diff_rows, digits)],
            "lo": [_rounded(d["lo"], n) for d, n in zip(diff_rows, digits)],
            "hi": [_rounded(d["hi"], n) for d, n in zip(diff_rows, digits)],
            "excludes_zero": [bool(d["excludes_zero"]) for d in diff_rows],
            "clips": [d["clips"] for d in diff_rows], "seeds": [d["seeds"] for d in diff_rows]}
