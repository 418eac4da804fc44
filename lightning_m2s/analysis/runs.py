"""Runs of the sweeps from the MLflow store, as pandas frames.

Each sweep logs to the MLflow experiment `sweep-<ablation>`: one parent run (KIND sweep) with the grid's
floors and paired differences, one child run per trial (KIND trial) with its final test metrics.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from lightning_m2s import paper_results, tracking
from lightning_m2s.analysis import grids
from lightning_m2s.comparison import FLOOR_REFERENCE, reference_arm
from lightning_m2s.tags import (ABLATION, ARM, EXPERIMENT, KIND, METRICS_PREFIX, SEED, STUDY, SWEEP, TRIAL,
                                filter_tag)

NO_DATASET = "all"  # dataset of metrics that are per clip, not per evaluation set (latency, steps)
FLOOR_PREFIX = "floor: "  # the arm name of a grid's training-free floors in the tidy frame
STEPS_MARK = " @ "  # arm of a model tested at several step counts, per count: "<arm> @ <steps>"
SETTINGS = tuple(paper_results.METRIC_SETTINGS)  # lpips_net, ms_ssim, eval_size: tags m2s.metrics.<name>
TIDY_COLUMNS = ["experiment", "ablation", "arm", "seed", "dataset", "region", "metric", "value", "run_id", "study",
                "steps", *SETTINGS]
PAGE = 1000  # the most runs one search_runs call returns


def parse_metric(key: str) -> tuple[str, str, str, int | None] | None:
    """'test/real/psnr_inside' -> ('real', 'inside', 'psnr', None); 'test/latency_s' -> ('all', 'full',
    'latency_s', None); 'test/real/steps5/lpips' -> ('real', 'full', 'lpips', 5) and 'test/steps5/latency_s'
    -> ('all', 'full', 'latency_s', 5) (a model tested at several step counts); None for anything that is
    not a final test metric (train curves, validation)."""
    parts = key.split("/")
    if parts[0] != "test":
        return None
    steps = None
    counts = [p for p in parts[1:-1] if re.fullmatch(r"steps\d+", p)]
    if counts:
        steps = int(counts[0][len("steps"):])
        parts = [p for p in parts if p != counts[0]]
    if len(parts) not in (2, 3):
        return None
    if len(parts) == 2:
        return NO_DATASET, "full", parts[1], steps
    dataset, name = parts[1], parts[2]
    for region in ("inside", "outside"):
        if name.endswith("_" + region):
            return dataset, region, name[: -len(region) - 1], steps
    return dataset, "full", name, steps


def run_settings(tags: dict) -> dict[str, str | None]:
    """The metric settings a run was tagged with (None where an older run has no tag)."""
    return {name: tags.get(f"{METRICS_PREFIX}{name}") for name in SETTINGS}


def _seed(tag: str | None):
    try:
        return int(tag)
    except (TypeError, ValueError):
        return tag


def run_row(run, **fields) -> dict:
    """The columns every frame here takes from a run's tags, then `fields` (added, or replacing a tag's)."""
    tags = run.data.tags
    return {"experiment": tags.get(EXPERIMENT), "ablation": tags.get(ABLATION), "arm": tags.get(ARM),
            "seed": _seed(tags.get(SEED)), "run_id": run.info.run_id, "study": tags.get(STUDY),
            **run_settings(tags), **fields}


def _sweep_runs(client, ablations, kind: str) -> list:
    """Every run (any status) tagged KIND `kind` in the experiments `sweep-<ablation>` (ablations None: every
    sweep file's), all pages of each search."""
    runs = []
    for ablation in grids.sweep_names() if ablations is None else ablations:
        exp = client.get_experiment_by_name(f"sweep-{ablation}")
        if exp is None:
            continue
        token = None
        while True:
            page = client.search_runs([exp.experiment_id], filter_string=filter_tag(KIND, kind), max_results=PAGE,
                                      page_token=token)
            runs.extend(page)
            token = page.token
            if not token:
                break
    return runs


def _newest(runs, key) -> list:
    """The newest run (latest start) per key(run): a re-run replaces the earlier one."""
    newest = {}
    for run in runs:
        k = key(run)
        if k not in newest or run.info.start_time > newest[k].info.start_time:
            newest[k] = run
    return list(newest.values())


def run_overview(tracking_uri: str | None = None, ablations=None) -> pd.DataFrame:
    """One row per trial run, failed and unfinished ones included: how many runs each arm has, by status.
    `ablations`: the sweeps to read (None: every sweep file's)."""
    rows = [run_row(run, status=run.info.status, start_time=run.info.start_time)
            for run in _sweep_runs(tracking.client(tracking_uri), ablations, TRIAL)]
    columns = ["experiment", "ablation", "arm", "seed", "status", "run_id", "start_time"]
    return pd.DataFrame(rows, columns=columns)


def status_counts(overview: pd.DataFrame) -> pd.DataFrame:
    """Trial runs per (experiment, ablation, arm) and status: what exists, what failed, what is running."""
    if overview.empty:
        return pd.DataFrame()
    return overview.groupby(["experiment", "ablation", "arm", "status"]).size().unstack("status", fill_value=0)


def _trial_rows(run) -> list[dict]:
    """A finished trial's tidy rows: one per final test metric (and step count)."""
    metrics = run.data.metrics
    parsed = {key: parse_metric(key) for key in metrics}
    # Tested at several step counts: every count has its steps<N> names; the plain ones repeat the first
    several = any(p is not None and p[3] is not None for p in parsed.values())
    rows = []
    for key, p in parsed.items():
        if p is None or (several and p[3] is None and p[2] != "steps"):
            continue
        steps = p[3] if p[3] is not None else metrics.get("test/steps")
        rows.append(run_row(run, dataset=p[0], region=p[1], metric=p[2], value=float(metrics[key]),
                            steps=np.nan if steps is None else float(steps)))
    return rows


def _trial_key(run) -> tuple:
    """What one trial measures: the same arm evaluated at other steps is another row."""
    tags = run.data.tags
    return (tags.get(EXPERIMENT), tags.get(ABLATION), tags.get(ARM), tags.get(SEED), run.data.metrics.get("test/steps"))


def load_runs(tracking_uri: str | None = None, ablations=None, include_floors: bool = True) -> pd.DataFrame:
    """Tidy frame of the final test metrics of every FINISHED trial run: columns TIDY_COLUMNS, a row per run
    x metric; with include_floors, each grid's floors too (arm 'floor: <variant>', see load_floors).

    Failed, running and killed runs are left out. When one (experiment, ablation, arm, seed, steps) was run
    more than once, the newest finished run counts: a re-run replaces, it is not another seed.
    """
    trials = _sweep_runs(tracking.client(tracking_uri), ablations, TRIAL)
    finished = [run for run in trials if run.info.status == "FINISHED"]
    rows = [row for run in _newest(finished, _trial_key) for row in _trial_rows(run)]
    runs = pd.DataFrame(rows, columns=TIDY_COLUMNS)
    return pd.concat([runs, load_floors(tracking_uri, ablations)], ignore_index=True) if include_floors else runs


def _parent_runs(client, ablations) -> list:
    """The newest finished-or-running sweep (parent) run per (experiment, sweep)."""
    runs = _sweep_runs(client, ablations, SWEEP)
    return _newest(runs, lambda r: (r.data.tags.get(EXPERIMENT), r.info.experiment_id))


def load_floors(tracking_uri: str | None = None, ablations=None) -> pd.DataFrame:
    """The floors each grid logged on its parent run (`floor/<variant>/test/...`), as tidy rows whose arm is
    'floor: <variant>' (seed 0): they join every table and plot of that grid."""
    rows = []
    for run in _parent_runs(tracking.client(tracking_uri), ablations):
        for key, value in run.data.metrics.items():
            if not key.startswith("floor/"):
                continue
            _, variant, metric_key = key.split("/", 2)
            parsed = parse_metric(metric_key)
            if parsed is not None:
                rows.append(run_row(run, arm=f"{FLOOR_PREFIX}{variant}", seed=0, dataset=parsed[0],
                                    region=parsed[1], metric=parsed[2], value=float(value), steps=np.nan))
    return pd.DataFrame(rows, columns=TIDY_COLUMNS)


@contextlib.contextmanager
def _quiet_downloads():
    """No progress bar per downloaded artifact: each small file would print one into the report."""
    before = os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
        else:
            os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = before


def treatment_first(d: dict, ablation: str | None, arms=()) -> dict:
    """A paired difference as treatment - reference (comparison.reference_arm): a grid logged before that
    rule (reference = its first arm) reads the other way round; the difference and its bootstrap interval
    then change sign exactly."""
    known = grids.arms(ablation)
    reference = reference_arm(known or arms)
    # arm - classical fill is the floor comparison, always that way round (also where an arm is named so)
    if d["arm"] != reference or d["against"] == FLOOR_REFERENCE or d["against"] not in {*known, *arms}:
        return d
    return {**d, "arm": d["against"], "against": d["arm"], "label": f"{d['against']} - {d['arm']}",
            "mean": -d["mean"], "lo": -d["hi"], "hi": -d["lo"]}


def load_differences(tracking_uri: str | None = None, ablations=None) -> pd.DataFrame:
    """The paired differences with 95% bootstrap intervals that each grid's sweep printed and logged
    (`comparison/comparison.json` on its parent run): one row per comparison, test set and metric, each
    as treatment - reference (`treatment_first`)."""
    client = tracking.client(tracking_uri)
    rows = []
    for run in _parent_runs(client, ablations):
        with tempfile.TemporaryDirectory() as tmp, _quiet_downloads():
            try:
                path = client.download_artifacts(run.info.run_id, "comparison/comparison.json", tmp)
            except Exception:  # noqa: BLE001 - a grid without a logged comparison yet
                continue
            differences = json.loads(Path(path).read_text()).get("differences", [])
        ablation = run.data.tags.get(ABLATION)
        arms = [d["arm"] for d in differences]
        rows += [run_row(run, **treatment_first(d, ablation, arms)) for d in differences]
    columns = ["experiment", "ablation", "label", "arm", "against", "dataset", "metric", "mean", "lo", "hi",
               "clips", "seeds", "excludes_zero"]
    return pd.DataFrame(rows, columns=columns)


def load_qualitative(tracking_uri: str | None, run_id: str, dataset: str) -> dict[str, np.ndarray] | None:
    """The run's `qualitative/<dataset>_clip0.npz` arrays (left, warped, mask, output, right), or None when it
    has none."""
    import mlflow

    path = f"qualitative/{dataset}_clip0.npz"
    uri = tracking.resolve_uri(tracking_uri)
    if path not in {f.path for f in tracking.client(uri).list_artifacts(run_id, "qualitative")}:
        return None
    with tempfile.TemporaryDirectory() as tmp, _quiet_downloads():
        local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path, dst_path=tmp, tracking_uri=uri)
        with np.load(local) as data:
            return {k: data[k] for k in data.files}


def split_by_steps(runs: pd.DataFrame) -> pd.DataFrame:
    """The tidy runs with each arm that was tested at several step counts renamed per count
    ('A_B_standard @ 25'), so that bars and seeds never mix step counts."""
    counts = runs.dropna(subset=["steps"]).groupby(["ablation", "arm"]).steps.nunique()
    several = {k for k, n in counts.items() if n > 1}
    if not several:
        return runs
    rename = [(ab, arm) in several and st == st for ab, arm, st in zip(runs.ablation, runs.arm, runs.steps)]
    arms = [f"{arm}{STEPS_MARK}{int(st)}" if r else arm for arm, st, r in zip(runs.arm, runs.steps, rename)]
    return runs.assign(arm=arms)


def has_runs(runs: pd.DataFrame, ablation: str) -> bool:
    """Whether the grid has finished trial runs (its floors alone are not a run of it)."""
    return bool(((runs.ablation == ablation) & ~runs.arm.str.startswith(FLOOR_PREFIX)).any())
