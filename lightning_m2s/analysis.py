"""Tables 4-10 of the paper from the sweeps' MLflow runs, beside the paper's published numbers.

The notebook `notebooks/tables_4_10.ipynb` only calls this module. Data flow:

    load_runs(uri) -> tidy frame (one row per finished trial run x metric)
    build_table(runs, "4") -> TableResult (ours: mean and std over seeds; paper: published numbers)
    plot_* (runs, ...) -> matplotlib Figures

What the sweeps log (one MLflow experiment `sweep-<ablation>`, one child run per trial tagged
m2s.kind=trial, m2s.arm, m2s.seed, and the metric settings m2s.metrics.*): final metrics
`test/<dataset>/<metric>[_inside|_outside]`, `test/latency_s`, `test/steps`, and for a model tested at
several step counts also `test/<dataset>/steps<N>/<metric>` and `test/steps<N>/latency_s` for each N
(the plain names then repeat the first count), and the artifact `qualitative/<dataset>_clip0.npz`.
A table cell with no finished run is NaN (shown as "—"); nothing is filled in.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from lightning_m2s import paper_results, tracking
from lightning_m2s.config import PROJECT_ROOT
from lightning_m2s.errors import M2SError
from lightning_m2s.evaluation import FLOORS

NOTEBOOK = PROJECT_ROOT / "notebooks" / "tables_4_10.ipynb"
ABLATIONS = ("left_cond", "left_cond_diffusion", "full_attention", "loss", "inference_steps", "runtime", "baselines",
             "hparams")
# The arms each grid sweep has, in the order plots show them (arms found beyond these are appended).
ARMS = {
    "left_cond": ("without_left", "with_left"),
    "left_cond_diffusion": ("without_left", "with_left"),
    "full_attention": ("without_full_attention", "with_full_attention"),
    "loss": ("A_B_standard", "C_latent", "D_end_to_end"),
    "inference_steps": ("standard", "end_to_end"),
    "runtime": ("without_full_attention", "with_full_attention"),
    "baselines": ("warp_only", "classical_fill", "m2svid"),
}
DATASET_ORDER = ("synthetic", "real", "stereo4d", "ego4d")
REGIONS = ("full", "inside", "outside")
QUALITY = ("psnr", "ms_ssim", "lpips")
STEPS_MARK = " @ "  # arm of a model tested at several step counts, per count: "<arm> @ <steps>"
OTHER_SETTINGS = "≠ paper"  # the display column of rows measured otherwise than the paper
NO_DATASET = "all"  # dataset of metrics that are per clip, not per evaluation set (latency, steps)
DIGITS = {"psnr": 2, "ms_ssim": 3, "lpips": 3, "latency_s": 3, "temporal_error": 4}
FLOOR_PREFIX = "floor: "  # the arm name of a grid's training-free floors in the tidy frame
SETTINGS = tuple(paper_results.METRIC_SETTINGS)  # lpips_net, ms_ssim, eval_size: tags m2s.metrics.<name>
TIDY_COLUMNS = ["experiment", "ablation", "arm", "seed", "dataset", "region", "metric", "value", "run_id", "study",
                "steps", *SETTINGS]


# ---------------------------------------------------------------- loading


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
    return {name: tags.get(f"m2s.metrics.{name}") for name in SETTINGS}


def _trial_runs(client, ablations) -> list:
    """Every trial run (any status) of the given ablations' experiments."""
    runs = []
    for ablation in ablations:
        exp = client.get_experiment_by_name(f"sweep-{ablation}")
        if exp is None:
            continue
        token = None
        while True:  # search_runs pages at 1000 runs
            page = client.search_runs([exp.experiment_id], filter_string="tags.`m2s.kind` = 'trial'",
                                      max_results=1000, page_token=token)
            runs.extend(page)
            token = page.token
            if not token:
                break
    return runs


def _seed(tag: str | None):
    try:
        return int(tag)
    except (TypeError, ValueError):
        return tag


def run_overview(tracking_uri: str | None = None, ablations=ABLATIONS) -> pd.DataFrame:
    """One row per trial run, failed and unfinished ones included: how many runs each arm has, by status."""
    rows = []
    for run in _trial_runs(tracking.client(tracking_uri), ablations):
        tags = run.data.tags
        rows.append({"experiment": tags.get("m2s.experiment"), "ablation": tags.get("m2s.ablation"),
                     "arm": tags.get("m2s.arm"), "seed": _seed(tags.get("m2s.seed")), "status": run.info.status,
                     "run_id": run.info.run_id, "start_time": run.info.start_time})
    columns = ["experiment", "ablation", "arm", "seed", "status", "run_id", "start_time"]
    return pd.DataFrame(rows, columns=columns)


def status_counts(overview: pd.DataFrame) -> pd.DataFrame:
    """Trial runs per (experiment, ablation, arm) and status: what exists, what failed, what is running."""
    if overview.empty:
        return pd.DataFrame()
    return overview.groupby(["experiment", "ablation", "arm", "status"]).size().unstack("status", fill_value=0)


def load_runs(tracking_uri: str | None = None, ablations=ABLATIONS, include_floors: bool = True) -> pd.DataFrame:
    """Tidy frame of the final test metrics of every FINISHED trial run: columns TIDY_COLUMNS; with
    include_floors, each grid's floors too (arm 'floor: <variant>', see load_floors).

    Failed, running and killed runs are left out. When one (experiment, ablation, arm, seed, steps) was run
    more than once, the newest finished run counts: a re-run replaces, it is not another seed.
    """
    newest = {}
    for run in _trial_runs(tracking.client(tracking_uri), ablations):
        if run.info.status != "FINISHED":
            continue
        tags = run.data.tags
        key = (tags.get("m2s.experiment"), tags.get("m2s.ablation"), tags.get("m2s.arm"), tags.get("m2s.seed"),
               run.data.metrics.get("test/steps"))  # the same arm evaluated at other steps is another row
        if key not in newest or run.info.start_time > newest[key].info.start_time:
            newest[key] = run
    rows = []
    for run in newest.values():
        tags = run.data.tags
        parsed_keys = {key: parse_metric(key) for key in run.data.metrics}
        # Tested at several step counts: every count has its steps<N> names; the plain ones repeat the first
        several = any(p is not None and p[3] is not None for p in parsed_keys.values())
        for key, parsed in parsed_keys.items():
            if parsed is None or (several and parsed[3] is None and parsed[2] != "steps"):
                continue
            steps = parsed[3] if parsed[3] is not None else run.data.metrics.get("test/steps")
            rows.append({"experiment": tags.get("m2s.experiment"), "ablation": tags.get("m2s.ablation"),
                         "arm": tags.get("m2s.arm"), "seed": _seed(tags.get("m2s.seed")),
                         "dataset": parsed[0], "region": parsed[1], "metric": parsed[2],
                         "value": float(run.data.metrics[key]), "run_id": run.info.run_id,
                         "study": tags.get("m2s.study"), "steps": np.nan if steps is None else float(steps),
                         **run_settings(tags)})
    runs = pd.DataFrame(rows, columns=TIDY_COLUMNS)
    return pd.concat([runs, load_floors(tracking_uri, ablations)], ignore_index=True) if include_floors else runs


def _parent_runs(client, ablations) -> list:
    """The newest finished-or-running sweep (parent) run per (experiment, ablation)."""
    newest = {}
    for ablation in ablations:
        exp = client.get_experiment_by_name(f"sweep-{ablation}")
        if exp is None:
            continue
        for run in client.search_runs([exp.experiment_id], filter_string="tags.`m2s.kind` = 'sweep'", max_results=1000):
            key = (run.data.tags.get("m2s.experiment"), ablation)
            if key not in newest or run.info.start_time > newest[key].info.start_time:
                newest[key] = run
    return list(newest.values())


def load_floors(tracking_uri: str | None = None, ablations=ABLATIONS) -> pd.DataFrame:
    """The floors each grid logged on its parent run (`floor/<variant>/test/...`), as tidy rows whose arm is
    'floor: <variant>' (seed 0): they join every table and plot of that grid."""
    rows = []
    for run in _parent_runs(tracking.client(tracking_uri), ablations):
        tags = run.data.tags
        for key, value in run.data.metrics.items():
            if not key.startswith("floor/"):
                continue
            _, variant, metric_key = key.split("/", 2)
            parsed = parse_metric(metric_key)
            if parsed is None:
                continue
            rows.append({"experiment": tags.get("m2s.experiment"), "ablation": tags.get("m2s.ablation"),
                         "arm": f"{FLOOR_PREFIX}{variant}", "seed": 0, "dataset": parsed[0], "region": parsed[1],
                         "metric": parsed[2], "value": float(value), "run_id": run.info.run_id,
                         "study": tags.get("m2s.study"), "steps": np.nan, **run_settings(tags)})
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
    from lightning_m2s.comparison import FLOOR_REFERENCE, reference_arm

    reference = reference_arm(ARMS.get(ablation) or arms)
    # arm - classical fill is the floor comparison, always that way round (also where an arm is named so)
    if d["arm"] != reference or d["against"] == FLOOR_REFERENCE or d["against"] not in set(ARMS.get(ablation, ())) | set(arms):
        return d
    return {**d, "arm": d["against"], "against": d["arm"], "label": f"{d['against']} - {d['arm']}",
            "mean": -d["mean"], "lo": -d["hi"], "hi": -d["lo"]}


def load_differences(tracking_uri: str | None = None, ablations=ABLATIONS) -> pd.DataFrame:
    """The paired differences with 95% bootstrap intervals that each grid's sweep printed and logged
    (`comparison/comparison.json` on its parent run): one row per comparison, test set and metric, each
    as treatment - reference (`treatment_first`)."""
    import json

    client = tracking.client(tracking_uri)
    rows = []
    for run in _parent_runs(client, ablations):
        with tempfile.TemporaryDirectory() as tmp, _quiet_downloads():
            try:
                path = client.download_artifacts(run.info.run_id, "comparison/comparison.json", tmp)
            except Exception:  # noqa: BLE001 - a grid without a logged comparison yet
                continue
            data = json.loads(Path(path).read_text())
        ablation = run.data.tags.get("m2s.ablation")
        arms = [d["arm"] for d in data.get("differences", [])]
        for d in data.get("differences", []):
            rows.append({"experiment": run.data.tags.get("m2s.experiment"), "ablation": ablation,
                         **treatment_first(d, ablation, arms)})
    columns = ["experiment", "ablation", "label", "arm", "against", "dataset", "metric", "mean", "lo", "hi",
               "clips", "seeds", "excludes_zero"]
    return pd.DataFrame(rows, columns=columns)


def differences_table(diffs: pd.DataFrame, ablation: str) -> pd.DataFrame:
    """One grid's paired differences for reading: 'mean [lo, hi]' with * where the interval excludes 0."""
    sub = diffs[diffs.ablation == ablation]
    if sub.empty:
        return pd.DataFrame()
    digits = lambda m: 3 if m.startswith(("lpips", "ms_ssim")) else 2  # noqa: E731
    cell = sub.apply(lambda r: f"{r['mean']:+.{digits(r.metric)}f} [{r.lo:+.{digits(r.metric)}f}, "
                               f"{r.hi:+.{digits(r.metric)}f}]{' *' if r.excludes_zero else ''}", axis=1)
    label = sub.arm + " − " + sub.against  # treatment − reference
    out = sub.assign(cell=cell, label=label).pivot_table(index=["experiment", "label"], columns=["dataset", "metric"],
                                                         values="cell", aggfunc="first", sort=False)
    clips = sub.groupby("dataset").clips.max()
    out.columns = pd.MultiIndex.from_tuples([(f"{d} ({clips[d]} clips)", metric_header(m, delta=True))
                                             for d, m in out.columns])
    out.index.names = ["experiment", "treatment − reference"]
    return out


def metric_header(metric: str, delta: bool = False) -> str:
    """'psnr_inside' -> 'PSNR inside (dB) ↑'; with delta, 'ΔPSNR inside (dB) ↑' (↑: higher is better)."""
    from lightning_m2s.comparison import arrow, base_metric, unit

    base = base_metric(metric)
    name = {"psnr": "PSNR", "lpips": "LPIPS", "ms_ssim": "MS-SSIM", "latency_s": "latency",
            "temporal_error": "temporal error"}.get(base, base)
    region = metric[len(base):].replace("_", " ")
    units = unit(metric) or ("s" if base == "latency_s" else "")
    return f"{'Δ' if delta else ''}{name}{region}{f' ({units})' if units else ''} {arrow(metric)}"


def plot_differences(diffs: pd.DataFrame, ablation: str, metrics=("psnr", "lpips")):
    """Each test set x metric: every comparison's mean paired difference with its 95% interval (0 marked)."""
    sub = diffs[(diffs.ablation == ablation) & diffs.metric.isin(metrics)]
    if sub.empty:
        return _empty(f"no paired differences logged for sweep-{ablation} yet")
    several = sub.experiment.nunique() > 1
    sub = sub.assign(label=sub.arm + " − " + sub.against + ((" (" + sub.experiment + ")") if several else ""))
    sub = sub.drop_duplicates(["label", "dataset", "metric"])  # treatment − reference, each once
    datasets = _ordered(sub.dataset.unique(), DATASET_ORDER)
    labels = list(dict.fromkeys(sub.label))
    palette = arm_colors(list(dict.fromkeys(list(ARMS.get(ablation, ())) + list(sub.arm))))
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


def run_table(runs: pd.DataFrame, ablation: str) -> pd.DataFrame:
    """One row per finished run of an ablation and step count (arm, seed, steps), one column per test
    metric: the raw numbers."""
    sub = runs[runs.ablation == ablation]
    if sub.empty:
        return pd.DataFrame()
    sub = sub.assign(key=sub.dataset + "/" + sub.metric + np.where(sub.region == "full", "", "_" + sub.region),
                     steps=sub.steps.fillna(0).astype(int))  # floors: no steps
    return sub.pivot_table(index=["experiment", "arm", "seed", "steps"], columns="key", values="value", aggfunc="first")


# ---------------------------------------------------------------- tables


@dataclass(frozen=True)
class Row:
    """One line of a paper table: its label, where our runs come from, and the paper row it matches."""

    label: str
    steps: str  # the inference-steps column as the paper prints it ("—" where it has none)
    ablation: str | None = None  # None: the paper has this row, we have no runs for it
    arm: str | None = None
    paper: str | None = None  # row key in paper_results; None: a row of ours only
    match_steps: bool = False  # the arm alone does not fix the steps: keep its numbers at `steps` steps

    @property
    def source(self) -> str:
        return f"{self.ablation}/{self.arm}" if self.ablation else "—"


@dataclass(frozen=True)
class TableSpec:
    number: str
    title: str
    about: str  # one sentence on what the paper's table shows
    rows: tuple[Row, ...]
    regions: tuple[str, ...] = ("full",)
    metrics: tuple[str, ...] = QUALITY
    floors_from: str | None = None  # the grid whose floors the table shows; None: its first row's


_WARP, _LEFT = "Cond. with V_r^warp + M_r^occ", "Cond. with V_r^warp + M_r^occ + V_l"
_COND_ROWS = (
    # The 25-step rows are standard diffusion models (their own grid); the 1-step rows end-to-end ones.
    Row(_WARP, "25", "left_cond_diffusion", "without_left", "warp+mask", match_steps=True),
    Row(_LEFT, "25", "left_cond_diffusion", "with_left", "warp+mask+left", match_steps=True),
    Row(_WARP, "1", "left_cond", "without_left", "warp+mask", match_steps=True),
    Row(_LEFT, "1", "left_cond", "with_left", "warp+mask+left", match_steps=True),
    # The full_attention sweep's control arm is the paper's "+ V_l, 1 step" row again, from its own runs.
    Row(_LEFT, "1", "full_attention", "without_full_attention", "warp+mask+left", match_steps=True),
    Row("+full attention", "1", "full_attention", "with_full_attention", "+full attention", match_steps=True),
)
_LOSS_ROWS = (  # A and B: one standard diffusion model, tested at 25 and at 1 step
    Row("A Standard loss (1)", "25", "loss", "A_B_standard", "A", match_steps=True),
    Row("B Standard loss (1)", "1", "loss", "A_B_standard", "B", match_steps=True),
    Row("C L_latent (2)", "1", "loss", "C_latent", "C"),
    Row("D L_latent + L_LPIPS + L_L1 (5)", "1", "loss", "D_end_to_end", "D"),
)
_STANDARD, _E2E = "Sampling t · L_latent", "Fixed t=T · L_latent + L_LPIPS + L_L1"

TABLES = {
    "4": TableSpec("4", "Left-view conditioning and full attention at disoccluded pixels",
                   "Conditioning on the left video improves every metric (with 25 and with 1 inference step); "
                   "full attention at disoccluded pixels leaves the metrics unchanged.", _COND_ROWS,
                   floors_from="left_cond"),
    "5": TableSpec("5", "Inference strategies and losses",
                   "The standard diffusion loss needs 25 steps; 1-step inference blurs (worse LPIPS), latent-only "
                   "training barely helps, and end-to-end training with image losses (Eq. 5) is best on LPIPS.",
                   _LOSS_ROWS),
    "6": TableSpec("6", "Comparison with other methods, full view / inside / outside the disocclusion mask",
                   "On Stereo4D M2SVid has the best full-image PSNR and LPIPS; SVG keeps the best MS-SSIM by leaving "
                   "visible pixels untouched. Here the baselines are ours: warping alone and a classical fill.",
                   (Row("SVG", "50", paper="SVG"),
                    Row("StereoCrafter", "25", paper="StereoCrafter"),
                    Row("StereoCrafter", "1", paper="StereoCrafter"),
                    Row("Warp only (holes left)", "—", "baselines", "warp_only"),
                    Row("Classical fill", "—", "baselines", "classical_fill"),
                    Row("M2SVid (Ours)", "1", "baselines", "m2svid", "M2SVid")),
                   regions=REGIONS),
    "7": TableSpec("7", "Table 4 with metrics inside the disoccluded regions",
                   "Left-view conditioning also improves inpainting slightly inside the disocclusion mask.",
                   _COND_ROWS, regions=("full", "inside"), floors_from="left_cond"),
    "8": TableSpec("8", "Table 5 with metrics inside the disoccluded regions",
                   "Latent-only end-to-end training inpaints about as well as 1-step standard diffusion; the image "
                   "losses of Eq. 5 mostly lower LPIPS.", _LOSS_ROWS, regions=("full", "inside")),
    "9": TableSpec("9", "Latency with and without full attention",
                   "Full attention at disoccluded pixels adds little run time (2.0 s → 2.1 s on an A100 for a "
                   "512x512 16-frame video).",
                   (Row("without full attention on the disoccluded regions", "1", "runtime", "without_full_attention",
                        "without full attention"),
                    Row("with full attention on the disoccluded regions", "1", "runtime", "with_full_attention",
                        "with full attention")),
                   metrics=("latency_s",)),
    "10": TableSpec("10", "LPIPS against the number of inference steps",
                    "With sampled t more steps help and 1 step is poor; the model trained at fixed t=T end to end is "
                    "best at 1 step and gets worse with more steps.",
                    tuple(Row(_STANDARD, s, "inference_steps", "standard", "sampled t", match_steps=True)
                          for s in ("1", "5", "25"))
                    + tuple(Row(_E2E, s, "inference_steps", "end_to_end", "fixed t=T", match_steps=True)
                            for s in ("1", "5", "25")),
                    metrics=("lpips",)),
}


@dataclass
class TableResult:
    """A paper table with our numbers and the paper's side by side.

    values: index (row, steps, ours from), columns (source, dataset, region, metric); source is "ours"
            (or "ours: <experiment>" when runs of several experiments exist) with the mean over seeds, and
            "paper" with the published number. NaN where there is no finished run / no published number.
    std:    our columns only: standard deviation over seeds (NaN with fewer than two seeds).
    seeds:  index as values, one column per ours source: the number of seeds behind each row.
    missing: "ablation/arm" (with "at N steps" where the steps pick the row) of each row without a finished run.
    settings: index as values, one column per ours source: how the row's runs measured where that differs
            from the paper (paper_results.METRIC_SETTINGS), e.g. "LPIPS alex, 64 px"; "" where it does not.
    """

    spec: TableSpec
    values: pd.DataFrame
    std: pd.DataFrame
    seeds: pd.DataFrame
    missing: list[str]
    settings: pd.DataFrame | None = None

    def note(self) -> str:
        """One line naming the rows without runs, and whether ours were measured otherwise than the paper."""
        if not self.missing:
            text = f"Table {self.spec.number}: every row of ours has finished runs."
        else:
            text = f"Table {self.spec.number}: no finished run yet for {', '.join(self.missing)} (shown as —)."
        if self.settings is not None and (self.settings != "").any().any():
            paper = paper_results.METRIC_SETTINGS
            text += (f" Rows with a '{OTHER_SETTINGS}' entry were measured with other metric settings than the paper's "
                     f"(LPIPS {paper['lpips_net']}, MS-SSIM {paper['ms_ssim']}, {paper['eval_size']} px): "
                     "compare them with each other, not with the paper's numbers.")
        return text

    def display(self) -> pd.DataFrame:
        """Strings for reading: ours as 'mean ± std' after a seeds count, the paper's as printed, '—' if missing."""
        out = {}
        for col in self.values.columns:
            source, metric = col[0], col[3]
            if source == "paper":
                digits = 1 if metric == "psnr" else DIGITS.get(metric, 3)  # the paper prints PSNR to 0.1 dB
                out[col] = [_fmt(v, None, digits) for v in self.values[col]]
                continue
            if (source, "seeds", "", "") not in out:
                out[source, "seeds", "", ""] = self.seeds[source].astype(int).astype(str).tolist()
                if self.settings is not None:
                    out[source, OTHER_SETTINGS, "", ""] = self.settings[source].tolist()
            out[col] = [_fmt(v, s, DIGITS.get(metric, 3)) for v, s in zip(self.values[col], self.std[col])]
        shown = pd.DataFrame(out, index=self.values.index)
        shown.columns.names = self.values.columns.names
        return shown


    def html(self) -> str:
        """The table for the notebook: one block per region (so that ours and the paper's fit 1400 px side by
        side), group headers spanning their columns, every row labelled, the paper's notation typeset, and
        the metric settings of rows measured otherwise than the paper as footnotes."""
        shown = self.display()
        notes = {}
        blocks = []
        for col in [c for c in shown.columns if c[1] == OTHER_SETTINGS]:
            marks = []
            for text in shown[col]:
                if text and text not in notes:
                    notes[text] = "*" * (len(notes) + 1)
                marks.append(notes.get(text, ""))
            shown[col] = marks
        regions = [r for r in self.spec.regions if any(c[2] == r for c in shown.columns)]
        for region in regions:
            cols = [c for c in shown.columns if c[2] in (region, "")]
            part = shown[cols].copy()
            part.columns = pd.MultiIndex.from_tuples([(c[0], c[1], metric_header(c[3]) if c[3] else "") for c in cols],
                                                     names=["source", "dataset", "metric"])
            part.index = pd.MultiIndex.from_tuples([(typeset(r), st, src) for r, st, src in part.index],
                                                   names=part.index.names)
            caption = "" if len(regions) == 1 else {"full": "Full frame", "inside": "Inside the disocclusion mask",
                                                    "outside": "Outside the disocclusion mask"}[region]
            styler = part.style.set_table_styles(TABLE_STYLE).set_caption(caption)
            blocks.append(styler.to_html(sparse_index=False, sparse_columns=True))
        footer = "".join(f"<br>{mark} measured with {text} (the paper: LPIPS {paper_results.METRIC_SETTINGS['lpips_net']}, "
                         f"MS-SSIM {paper_results.METRIC_SETTINGS['ms_ssim']}, {paper_results.METRIC_SETTINGS['eval_size']} px)"
                         for text, mark in notes.items())
        return "".join(blocks) + (f"<p style='font-size: 0.85em'>{footer[4:]}</p>" if footer else "")


TABLE_STYLE = [  # group headers centred over the columns they span, a rule under each group, compact cells
    {"selector": "th.col_heading", "props": "text-align: center; border-bottom: 1px solid #aaa; padding: 2px 6px"},
    {"selector": "th.row_heading", "props": "text-align: left; font-weight: normal; padding: 2px 6px"},
    {"selector": "td", "props": "text-align: right; padding: 2px 6px; white-space: nowrap"},
    {"selector": "caption", "props": "caption-side: top; text-align: left; font-weight: bold"},
    {"selector": "", "props": "font-size: 0.85em; margin-bottom: 1em"},
]


def typeset(label: str) -> str:
    """The paper's notation as HTML: 'V_r^warp' -> V<sub>r</sub><sup>warp</sup>, 'L_latent' -> L<sub>latent</sub>."""
    label = re.sub(r"([A-Z])_(\w)\^(\w+)", r"\1<sub>\2</sub><sup>\3</sup>", label)
    return re.sub(r"\b([A-Z])_([A-Za-z0-9]+)", r"\1<sub>\2</sub>", label)


def _fmt(value: float, spread: float | None, digits: int) -> str:
    if pd.isna(value):
        return "—"
    text = f"{value:.{digits}f}"
    return text if spread is None or pd.isna(spread) else f"{text} ± {spread:.{digits}f}"


def _ordered(values, order) -> list:
    values = list(dict.fromkeys(values))
    return [v for v in order if v in values] + sorted(v for v in values if v not in order)


def _rows_runs(runs: pd.DataFrame, row: Row) -> pd.DataFrame:
    """The tidy rows of the runs behind one table row."""
    sub = runs[(runs.ablation == row.ablation) & (runs.arm == row.arm)]
    if row.match_steps:
        sub = sub[sub.steps == float(row.steps)]
    return sub


def build_table(runs: pd.DataFrame, number: str, paper: pd.DataFrame | None = None) -> TableResult:
    """Table `number` ("4" ... "10") in the paper's layout from the tidy runs of load_runs()."""
    spec = TABLES[str(number)]
    paper = paper_results.frame() if paper is None else paper
    paper = paper[paper.table == spec.number]
    rows = spec.rows + _floor_rows(spec)
    index = pd.MultiIndex.from_tuples([(r.label, r.steps, r.source) for r in rows],
                                      names=["row", "steps", "ours from"])
    per_row = [_rows_runs(runs, r) if r.ablation else runs.iloc[:0] for r in rows]
    relevant = pd.concat(per_row)
    relevant = relevant[relevant.metric.isin(spec.metrics) & relevant.region.isin(spec.regions)]

    # Our column groups: the datasets the runs evaluated on (synthetic and real when there are none yet).
    if spec.metrics == ("latency_s",):
        our_datasets = [NO_DATASET]
    else:
        found = relevant.dataset.unique()
        our_datasets = _ordered(found, DATASET_ORDER) if len(found) else ["synthetic", "real"]
    # One "ours" column group per experiment (tiny, svd_xt, ...) that has runs for this table: their numbers
    # are never averaged together. Plain "ours" when the whole store holds a single experiment.
    in_store = sorted(runs.experiment.dropna().unique())
    experiments = sorted(pd.concat(per_row).experiment.dropna().unique()) or in_store or [None]
    sources = {e: "ours" if len(in_store) <= 1 else f"ours: {e}" for e in experiments}

    def cols(source, datasets):
        return [(source, d, g, m) for d in datasets for g in spec.regions for m in spec.metrics]

    paper_datasets = _ordered(paper.dataset.unique(), DATASET_ORDER)
    columns = [c for e in experiments for c in cols(sources[e], our_datasets)] + cols("paper", paper_datasets)
    values = pd.DataFrame(np.nan, index=index, columns=pd.MultiIndex.from_tuples(
        columns, names=["source", "dataset", "region", "metric"]))
    std = values[[c for c in columns if c[0] != "paper"]].copy()
    seeds = pd.DataFrame(0, index=index, columns=list(sources.values()))
    settings = pd.DataFrame("", index=index, columns=list(sources.values()))
    compared = ("eval_size",) if spec.metrics == ("latency_s",) else SETTINGS  # latency depends on the size only
    missing = []

    for i, (row, sub) in enumerate(zip(rows, per_row)):
        if row.ablation and sub.empty and not row.arm.startswith(FLOOR_PREFIX):
            missing.append(f"{row.source} at {row.steps} step{'' if row.steps == '1' else 's'}"
                           if row.match_steps else row.source)
        for exp in experiments:
            mine = sub if exp is None else sub[sub.experiment == exp]
            seeds.iloc[i, list(sources).index(exp)] = mine.seed.nunique()
            settings.iloc[i, list(sources).index(exp)] = settings_note(mine, compared)
            for (d, g, m), group in mine.groupby(["dataset", "region", "metric"]):
                col = (sources[exp], d, g, m)
                if col in values.columns:
                    values.iloc[i, values.columns.get_loc(col)] = group.value.mean()
                    std.iloc[i, std.columns.get_loc(col)] = group.value.std(ddof=1)  # NaN for one seed
        if row.paper:
            mine = paper[(paper.row == row.paper) & (paper.steps == int(row.steps))]
            for rec in mine.itertuples():
                col = ("paper", rec.dataset, rec.region, rec.metric)
                if col in values.columns:
                    values.iloc[i, values.columns.get_loc(col)] = rec.value
    return TableResult(spec, values, std, seeds, missing, settings)


def settings_note(runs: pd.DataFrame, compared=SETTINGS) -> str:
    """How `runs` were measured where that differs from the paper's settings ("" when as the paper, or no
    runs): e.g. "LPIPS alex, MS-SSIM per_frame, 64 px"; "not recorded" for runs from before the tags."""
    paper = paper_results.METRIC_SETTINGS
    label = {"lpips_net": "LPIPS {}", "ms_ssim": "MS-SSIM {}", "eval_size": "{} px"}
    notes = []
    for combo in runs[list(compared)].drop_duplicates().itertuples(index=False):
        if any(pd.isna(v) for v in combo):
            note = "not recorded"
        else:
            note = ", ".join(label[k].format(v) for k, v in zip(compared, combo) if str(v) != paper[k])
        if note and note not in notes:
            notes.append(note)
    return " | ".join(notes)


def _floor_rows(spec: TableSpec) -> tuple[Row, ...]:
    """The training-free floors of the table's (first) grid, on exactly its test clips; none for latency."""
    ablation = spec.floors_from or next((r.ablation for r in spec.rows if r.ablation), None)
    if ablation is None or spec.metrics == ("latency_s",):
        return ()
    return tuple(Row(f"{FLOOR_PREFIX}{v.replace('_', ' ')}", "—", ablation, f"{FLOOR_PREFIX}{v}") for v in FLOORS)


def build_tables(runs: pd.DataFrame) -> dict[str, TableResult]:
    return {n: build_table(runs, n) for n in TABLES}


# ---------------------------------------------------------------- plots


def _arms(runs: pd.DataFrame, ablation: str) -> list[str]:
    found = runs.loc[runs.ablation == ablation, "arm"].unique()
    known = list(ARMS.get(ablation, ()))
    # an arm tested at several step counts is one bar per count ("A_B_standard @ 25"), after its name
    split = {a: sorted((f for f in found if f.startswith(f"{a}{STEPS_MARK}")), key=lambda f: int(f.split()[-1]))
             for a in known}
    ordered = [b for a in known for b in (split[a] or [a])]
    return ordered + sorted(a for a in found if a not in ordered)


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


def arm_colors(arms) -> dict[str, str]:
    """comparison.colors for the notebook's arm names: an arm split by step count keeps its arm's colour."""
    from lightning_m2s.comparison import colors

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
    datasets = _ordered(sub.dataset.unique(), DATASET_ORDER)
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


def plot_inference_steps(runs: pd.DataFrame, paper: pd.DataFrame | None = None):
    """Table 10: LPIPS against inference steps, standard vs end-to-end training; the paper's in its own panel."""
    paper = paper_results.frame() if paper is None else paper
    sub = runs[(runs.ablation == "inference_steps") & (runs.metric == "lpips") & (runs.region == "full")]
    datasets = _ordered(sub.dataset.unique(), DATASET_ORDER)
    fig = _figure(figsize=(4 * (len(datasets) + 1), 3.2))
    axes = fig.subplots(1, len(datasets) + 1, squeeze=False)
    palette = arm_colors(list(ARMS["inference_steps"]) + [f"{FLOOR_PREFIX}{f}" for f in FLOORS])
    for ax, d in zip(axes[0], datasets):
        regimes = (("standard", "sampled t (standard)"), ("end_to_end", "fixed t=T (Eq. 5)"))
        for k, (regime, label) in enumerate(regimes):
            pts = []
            for steps in (1, 5, 25):
                vals = sub[(sub.dataset == d) & (sub.arm == regime) & (sub.steps == steps)].value
                if len(vals):
                    pts.append((steps, vals.mean(), vals.std(ddof=1) if len(vals) > 1 else 0.0))
            if pts:
                x, y, e = zip(*pts)
                ax.errorbar(x, y, yerr=e, marker="o", capsize=3, color=palette[regime], label=label)
        for k, floor in enumerate(FLOORS):  # the grid's floors: no steps, a level line each
            vals = sub[(sub.dataset == d) & (sub.arm == f"{FLOOR_PREFIX}{floor}")].value
            if len(vals):
                ax.axhline(vals.mean(), ls=":", color=palette[f"{FLOOR_PREFIX}{floor}"], label=f"{FLOOR_PREFIX}{floor}")
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
        ax.set_xticks([1, 5, 25], ["1", "5", "25"])
        ax.set_xlabel("inference steps")
        ax.set_ylabel("LPIPS ↓ (lower is better)")
        ax.legend(fontsize=7)
    found = set(zip(sub.arm, sub.steps))
    missing = [f"{a} at {n} step{'s' if n > 1 else ''}" for a in ARMS["inference_steps"] for n in (1, 5, 25)
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
    arms = list(ARMS["runtime"])
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


def load_qualitative(tracking_uri: str | None, run_id: str, dataset: str) -> dict[str, np.ndarray] | None:
    """The run's `qualitative/<dataset>_clip0.npz` arrays, or None when it has none."""
    import mlflow

    path = f"qualitative/{dataset}_clip0.npz"
    uri = tracking.resolve_uri(tracking_uri)
    if path not in {f.path for f in tracking.client(uri).list_artifacts(run_id, "qualitative")}:
        return None
    with tempfile.TemporaryDirectory() as tmp, _quiet_downloads():
        local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path, dst_path=tmp, tracking_uri=uri)
        with np.load(local) as data:
            return {k: data[k] for k in data.files}


def plot_qualitative(runs: pd.DataFrame, ablation: str, tracking_uri: str | None = None, datasets=None):
    """Per dataset (rows): left, warped, mask, each arm's output (lowest seed's run), ground truth right."""
    sub = runs[runs.ablation == ablation]
    if sub.empty:
        return _empty(f"no finished runs in sweep-{ablation}")
    datasets = datasets or _ordered([d for d in sub.dataset.unique() if d != NO_DATASET], DATASET_ORDER)
    arms = [a for a in _arms(runs, ablation) if not a.startswith(FLOOR_PREFIX)]  # floors log no frames
    panels = {}  # (dataset, arm) -> arrays
    for d in datasets:
        for arm in arms:
            mine = sub[sub.arm == arm].sort_values("seed", key=lambda s: pd.to_numeric(s, errors="coerce"))
            for run_id in mine.run_id.unique():
                data = load_qualitative(tracking_uri, run_id, d)
                if data is not None:
                    panels[d, arm] = data
                    break
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
            elif image.ndim == 2:
                ax.imshow(image > 0, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            else:
                ax.imshow(image, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(columns[c], fontsize=8)
        axes[r, 0].set_ylabel(d)
    fig.suptitle(f"sweep-{ablation}: middle frame of clip 0")
    return fig


# ---------------------------------------------------------------- headless run


def run_notebook(tracking_uri: str | None, out_html: Path | None = None, notebook: Path = NOTEBOOK,
                 timeout: int = 1800) -> Path:
    """Execute the notebook headless (papermill, kernel python3) against `tracking_uri` and write its HTML
    report (default: next to the notebook). The source notebook is left unchanged; returns the HTML path."""
    import nbformat
    import papermill
    from nbconvert import HTMLExporter

    notebook = Path(notebook)
    out_html = Path(out_html) if out_html else notebook.with_suffix(".html")
    uri = tracking.resolve_uri(tracking_uri)  # a malformed URI fails here, before a kernel starts
    with tempfile.TemporaryDirectory() as tmp:
        executed = Path(tmp) / notebook.name
        try:
            papermill.execute_notebook(str(notebook), str(executed), parameters={"tracking_uri": uri},
                                       kernel_name="python3", cwd=str(notebook.parent), execution_timeout=timeout,
                                       progress_bar=False)
        except papermill.PapermillExecutionError as err:
            raise M2SError(f"{notebook}: cell {err.exec_count} failed: {err.ename}: {err.evalue}") from err
        # a report: the outputs only (the code is in the notebook), so the answers are what a reader sees first
        exporter = HTMLExporter(exclude_input=True, exclude_input_prompt=True, exclude_output_prompt=True)
        body, _ = exporter.from_notebook_node(nbformat.read(executed, as_version=4))
    out_html.parent.mkdir(parents=True, exist_ok=True)
    out_html.write_text(body, encoding="utf-8")
    return out_html


# ---------------------------------------------------------------- the answers, in words


def has_runs(runs: pd.DataFrame, ablation: str) -> bool:
    """Whether the grid has finished trial runs (its floors alone are not a run of it)."""
    return bool(((runs.ablation == ablation) & ~runs.arm.str.startswith(FLOOR_PREFIX)).any())


def not_run_line(ablation: str) -> str:
    """One line for a grid with no finished runs: what it is for and how to run it."""
    from lightning_m2s.cli import SWEEP_INFO

    tables, _, minutes = SWEEP_INFO.get(ablation, ("", "", None))
    where = f" (Table {tables})" if tables else ""
    took = f", about {minutes} min on the embedded default" if minutes else ""
    return f"`{ablation}`{where} has no finished runs: `make sweep ABLATION={ablation}`{took}."


def _verdict(d, higher_is_better: bool) -> str:
    if d.lo > 0 or d.hi < 0:
        return "better" if (d.lo > 0) == higher_is_better else "worse"
    return "no clear difference"


def _diff_text(d, unit: str) -> str:
    return f"{d['mean']:+.2f}{unit} [{d.lo:+.2f}, {d.hi:+.2f}]"


def answer(runs: pd.DataFrame, diffs: pd.DataFrame, ablation: str, metric: str = "psnr") -> str | None:
    """The grid's answer in words, from its logged paired differences (treatment − reference, 95% interval):
    which arm is better on each test set and by how much, then how every arm stands against the classical
    fill floor. None when the grid has no finished runs."""
    from lightning_m2s.comparison import FLOOR_REFERENCE, HIGHER_IS_BETTER, unit

    if not has_runs(runs, ablation):
        return None
    sub = diffs[(diffs.ablation == ablation) & (diffs.metric == metric)]
    mine = runs[(runs.ablation == ablation) & ~runs.arm.str.startswith(FLOOR_PREFIX)]
    seeds = int(mine.groupby("arm").seed.nunique().max())
    head = f"**{ablation}** ({', '.join(sorted(mine.experiment.dropna().unique()))}, {seeds} seed{'s' * (seeds > 1)}"
    if sub.empty:  # no logged comparison: the means, without intervals
        means = split_by_steps(mine[(mine.metric == metric) & (mine.region == "full")]).groupby(["dataset", "arm"]).value.mean()
        u = f" {unit(metric)}" if unit(metric) else ""
        parts = [f"on {d}: " + ", ".join(f"{a} {v:.2f}{u}" for a, v in means[d].items())
                 for d in _ordered(means.index.get_level_values(0).unique(), DATASET_ORDER)]
        return (head + f"): mean {metric_header(metric).rsplit(' ', 1)[0]} " + "; ".join(parts)
                + " (no paired differences logged: the sweep logs them with its table when the grid finishes).")
    higher, u = HIGHER_IS_BETTER[metric], f" {unit(metric)}" if unit(metric) else ""
    name = metric_header(metric).rsplit(" ", 1)[0]
    datasets = _ordered(sub.dataset.unique(), DATASET_ORDER)
    sentences = []
    for (arm, against), pair in sub[sub.against != FLOOR_REFERENCE].groupby(["arm", "against"], sort=False):
        parts = []
        for d in datasets:
            row = pair[pair.dataset == d]
            if len(row):
                r = row.iloc[0]
                verdict = _verdict(r, higher)
                text = (f"{arm} is {verdict} than {against} by {_diff_text(r, u)}" if verdict != "no clear difference"
                        else f"no clear difference between {arm} and {against} ({_diff_text(r, u)})")
                parts.append(f"on {d}, {text}")
        sentences.append("; ".join(parts) + ".")
    floor = sub[sub.against == FLOOR_REFERENCE]
    for d in datasets:
        rows = floor[floor.dataset == d]
        if rows.empty:
            continue
        verdicts = {r.arm: _verdict(r, higher) for r in rows.itertuples()}
        plural = {"better": "beat", "worse": "lose to", "no clear difference": "do not differ clearly from"}
        single = {"better": "beats", "worse": "loses to", "no clear difference": "does not differ clearly from"}
        numbers = ", ".join(f"{r.arm} {_diff_text(r, u)}" for _, r in rows.iterrows())
        if len(set(verdicts.values())) == 1:
            verdict = next(iter(verdicts.values()))
            who = {1: f"{next(iter(verdicts))} {single[verdict]}", 2: f"both arms {plural[verdict]}"}.get(
                len(verdicts), f"all arms {plural[verdict]}")
            sentences.append(f"On {d}, {who} the classical fill floor ({numbers}).")
        else:
            each = "; ".join(f"{a} {single[v]} it" for a, v in verdicts.items())
            sentences.append(f"On {d}, against the classical fill floor: {each} ({numbers}).")
    clips = ", ".join(f"{int(sub[sub.dataset == d].clips.max())} {d}" for d in datasets)
    return (f"{head}; {name}, treatment − reference, paired over the same test clips ({clips}), 95% bootstrap "
            f"interval): " + " ".join(sentences))


def answers(runs: pd.DataFrame, diffs: pd.DataFrame, ablations=ABLATIONS) -> str:
    """Markdown for the top of the report: each finished grid's answer in one paragraph, then one line per grid
    not run yet (how to run it)."""
    done = [a for a in ablations if has_runs(runs, a)]
    lines = [answer(runs, diffs, a) for a in done if a in ARMS]
    lines += [f"**{a}**: finished runs in the tables below (a search, no paired answer)." for a in done if a not in ARMS]
    todo = [not_run_line(a) for a in ablations if a not in done]
    text = "\n\n".join(lines) if lines else "No grid has finished runs in this store yet."
    return text + ("\n\n**Not run yet** (their sections below show the paper's numbers only):\n\n- " + "\n- ".join(todo)
                   if todo else "")


def show_grid(runs: pd.DataFrame, diffs: pd.DataFrame, ablation: str, tracking_uri: str | None = None,
              parts=("bars", "qualitative", "differences"), region: str = "full") -> None:
    """Display a grid's figures and paired differences in the notebook, or the one line that says how to run
    the grid when it has no finished runs."""
    from IPython.display import HTML, Markdown, display

    if not has_runs(runs, ablation):
        display(Markdown(not_run_line(ablation)))
        return
    if "bars" in parts:
        display(plot_ablation(runs, ablation, region=region))
    if "qualitative" in parts:
        display(plot_qualitative(runs, ablation, tracking_uri))
    if "differences" in parts:
        table = differences_table(diffs, ablation)
        if len(table):
            display(Markdown(f"Paired differences of `{ablation}` (treatment − reference; the same numbers as its "
                             "sweep printed; `*`: the interval excludes 0):"))
            display(HTML(table.style.set_table_styles(TABLE_STYLE).to_html(sparse_index=False)))
            display(plot_differences(diffs, ablation))
