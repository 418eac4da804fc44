"""What a sweep run returns (SweepResult) and prints: the grid's comparison, or the trials' values."""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lightning_m2s import comparison
from lightning_m2s.sweep.spec import SweepSpec


@dataclass
class TrialResult:
    number: int
    arm: str
    seed: int | None
    state: str  # an Optuna TrialState name: COMPLETE, FAIL, RUNNING, ...
    value: float | None  # the objective metric
    metrics: dict[str, float]
    run_id: str | None  # its MLflow run
    output_dir: str | None  # its checkpoints


@dataclass
class SweepResult:
    study: str
    objective: str
    direction: str
    parent_run_id: str
    trials: list[TrialResult]
    reference: str | None  # the arm differences are taken from (treatment - reference)
    per_clip: dict[str, dict]  # {"arms": {arm: [rows per seed]}, "floors": {variant: rows}}: what was compared
    comparison: dict[str, Any]  # lightning_m2s.comparison: {"datasets", "means", "differences", "reference"}
    failed_now: list[TrialResult] = field(default_factory=list)  # failed in this run, not retried since
    complete: bool = True  # every point done, or held by a live worker


def summarize(study, spec: SweepSpec, parent_run_id: str, client=None, floor_results: dict | None = None) -> SweepResult:
    """The study's trials; with a client, a grid's comparison of its arms' per-clip rows and the floors'."""
    trials = [TrialResult(t.number, t.params.get("arm", f"trial{t.number}"), t.params.get("seed"), t.state.name,
                          t.value, t.user_attrs.get("metrics", {}), t.user_attrs.get("run_id"),
                          t.user_attrs.get("output_dir"))
              for t in study.get_trials(deepcopy=False)]
    arms: dict[str, dict] = {}
    if spec.is_grid and client is not None:
        for t in trials:
            rows = per_clip_rows(t, client) if t.state == "COMPLETE" else []
            if rows:
                arms.setdefault(t.arm, {})[t.seed] = rows
    ordered = {a: [arms[a][s] for s in sorted(arms[a])] for a in spec.arms if a in arms}
    floor_rows = {k: v["per_clip"] for k, v in (floor_results or {}).items()}
    reference = comparison.reference_arm(spec.arms)
    return SweepResult(
        study=study.study_name, objective=spec.objective_metric, direction=spec.direction,
        parent_run_id=parent_run_id, trials=trials, reference=reference,
        per_clip={"arms": ordered, "floors": floor_rows},
        comparison={
            "datasets": comparison.datasets_of(ordered, floor_rows),
            "means": comparison.means(ordered, floor_rows) if ordered or floor_rows else [],
            "differences": comparison.differences(ordered, floor_rows, reference) if ordered else [],
            "reference": reference,
        })


def per_clip_rows(trial: TrialResult, client) -> list[dict]:
    """A finished trial's per-clip test rows: from its output folder, else its MLflow run's artifact."""
    from lightning_m2s.train import PER_CLIP_FILE, read_per_clip

    folder = Path(trial.output_dir or "")
    if (folder / PER_CLIP_FILE).is_file():
        return read_per_clip(folder)
    if trial.run_id is None:
        return []
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = client.download_artifacts(trial.run_id, f"metrics/{PER_CLIP_FILE}", tmp)
        except Exception:  # noqa: BLE001 - a run from before per-clip rows were logged
            return []
        return json.loads(Path(path).read_text())["rows"]


def format_table(result: SweepResult) -> str:
    """The grid's comparison (arms, floors, paired differences), or the trials' objective values."""
    c = result.comparison
    if c.get("means"):
        return comparison.format_comparison(c["means"], c["differences"], c["datasets"])
    done = [t for t in result.trials if t.state == "COMPLETE"]
    if not done:
        return "no completed trials"
    return "\n".join(f"{t.arm:<24} {result.objective} = {t.value:.4f}" for t in done)


def format_footer(result: SweepResult) -> str:
    """Under the table: each finished arm's checkpoint to use from here (best.ckpt, the lowest val/loss of
    its run; last.ckpt is the end of training, what a resume reads), with the commands that take it."""
    done = [t for t in result.trials if t.state == "COMPLETE" and t.output_dir]
    ckpts = {}
    for t in sorted(done, key=lambda t: (t.seed is None, t.seed)):
        best = Path(t.output_dir) / "checkpoints" / "best.ckpt"
        if best.is_file():
            ckpts.setdefault(t.arm, best)  # the lowest seed's
    if not ckpts:
        return ""
    width = max(len(a) for a in ckpts)
    lines = ["checkpoint of each arm (best.ckpt: lowest val/loss; convert or evaluate it):"]
    lines += [f"  {arm:<{width}}  {path}" for arm, path in ckpts.items()]
    first = next(iter(ckpts.values()))
    lines += [f"  m2s evaluate {first} --sources real",
              f"  m2s convert VIDEO.mp4 --checkpoint {first} --depth DEPTH.npz --out stereo.mp4"]
    return "\n".join(lines)
