"""Tables 4-10 in the paper's layout: our runs' numbers beside the published ones, and the raw tables
(one row per run, the paired differences) the notebook shows under each grid."""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import pandas as pd

from lightning_m2s import paper_results
from lightning_m2s.analysis.grids import ordered
from lightning_m2s.analysis.runs import FLOOR_PREFIX, NO_DATASET, SETTINGS
from lightning_m2s.comparison import arrow, base_metric, unit
from lightning_m2s.evaluation import FLOORS

DATASET_ORDER = ("synthetic", "real", "stereo4d", "ego4d")
REGIONS = ("full", "inside", "outside")
QUALITY = ("psnr", "ms_ssim", "lpips")
OTHER_SETTINGS = "≠ paper"  # the display column of rows measured otherwise than the paper
DIGITS = {"psnr": 2, "ms_ssim": 3, "lpips": 3, "latency_s": 3, "temporal_error": 4}
TABLE_STYLE = [  # group headers centred over the columns they span, a rule under each group, compact cells
    {"selector": "th.col_heading", "props": "text-align: center; border-bottom: 1px solid #aaa; padding: 2px 6px"},
    {"selector": "th.row_heading", "props": "text-align: left; font-weight: normal; padding: 2px 6px"},
    {"selector": "td", "props": "text-align: right; padding: 2px 6px; white-space: nowrap"},
    {"selector": "caption", "props": "caption-side: top; text-align: left; font-weight: bold"},
    {"selector": "", "props": "font-size: 0.85em; margin-bottom: 1em"},
]


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


def metric_header(metric: str, delta: bool = False) -> str:
    """'psnr_inside' -> 'PSNR inside (dB) ↑'; with delta, 'ΔPSNR inside (dB) ↑' (↑: higher is better)."""
    base = base_metric(metric)
    name = {"psnr": "PSNR", "lpips": "LPIPS", "ms_ssim": "MS-SSIM", "latency_s": "latency",
            "temporal_error": "temporal error"}.get(base, base)
    region = metric[len(base):].replace("_", " ")
    units = unit(metric) or ("s" if base == "latency_s" else "")
    return f"{'Δ' if delta else ''}{name}{region}{f' ({units})' if units else ''} {arrow(metric)}"


def typeset(label: str) -> str:
    """The paper's notation as HTML: 'V_r^warp' -> V<sub>r</sub><sup>warp</sup>, 'L_latent' -> L<sub>latent</sub>."""
    label = re.sub(r"([A-Z])_(\w)\^(\w+)", r"\1<sub>\2</sub><sup>\3</sup>", label)
    return re.sub(r"\b([A-Z])_([A-Za-z0-9]+)", r"\1<sub>\2</sub>", label)


def _fmt(value: float, spread: float | None, digits: int) -> str:
    if pd.isna(value):
        return "—"
    text = f"{value:.{digits}f}"
    return text if spread is None or pd.isna(spread) else f"{text} ± {spread:.{digits}f}"


def _paper_settings() -> str:
    paper = paper_results.METRIC_SETTINGS
    return f"LPIPS {paper['lpips_net']}, MS-SSIM {paper['ms_ssim']}, {paper['eval_size']} px"


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
            text += (f" Rows with a '{OTHER_SETTINGS}' entry were measured with other metric settings than the paper's "
                     f"({_paper_settings()}): compare them with each other, not with the paper's numbers.")
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
        notes = {}  # settings text -> its footnote mark
        for col in [c for c in shown.columns if c[1] == OTHER_SETTINGS]:
            marks = []
            for text in shown[col]:
                if text and text not in notes:
                    notes[text] = "*" * (len(notes) + 1)
                marks.append(notes.get(text, ""))
            shown[col] = marks
        regions = [r for r in self.spec.regions if any(c[2] == r for c in shown.columns)]
        blocks = [self._region_html(shown, region, caption=len(regions) > 1) for region in regions]
        footer = "<br>".join(f"{mark} measured with {text} (the paper: {_paper_settings()})"
                             for text, mark in notes.items())
        return "".join(blocks) + (f"<p style='font-size: 0.85em'>{footer}</p>" if footer else "")

    @staticmethod
    def _region_html(shown: pd.DataFrame, region: str, caption: bool) -> str:
        cols = [c for c in shown.columns if c[2] in (region, "")]
        part = shown[cols].copy()
        part.columns = pd.MultiIndex.from_tuples([(c[0], c[1], metric_header(c[3]) if c[3] else "") for c in cols],
                                                 names=["source", "dataset", "metric"])
        part.index = pd.MultiIndex.from_tuples([(typeset(r), st, src) for r, st, src in part.index],
                                               names=part.index.names)
        title = {"full": "Full frame", "inside": "Inside the disocclusion mask",
                 "outside": "Outside the disocclusion mask"}[region] if caption else ""
        styler = part.style.set_table_styles(TABLE_STYLE).set_caption(title)
        return styler.to_html(sparse_index=False, sparse_columns=True)


def _rows_runs(runs: pd.DataFrame, row: Row) -> pd.DataFrame:
    """The tidy rows of the runs behind one table row."""
    if not row.ablation:
        return runs.iloc[:0]
    sub = runs[(runs.ablation == row.ablation) & (runs.arm == row.arm)]
    if row.match_steps:
        sub = sub[sub.steps == float(row.steps)]
    return sub


def _floor_rows(spec: TableSpec) -> tuple[Row, ...]:
    """The training-free floors of the table's (first) grid, on exactly its test clips; none for latency."""
    ablation = spec.floors_from or next((r.ablation for r in spec.rows if r.ablation), None)
    if ablation is None or spec.metrics == ("latency_s",):
        return ()
    return tuple(Row(f"{FLOOR_PREFIX}{v.replace('_', ' ')}", "—", ablation, f"{FLOOR_PREFIX}{v}") for v in FLOORS)


def _columns(spec: TableSpec, runs: pd.DataFrame, relevant: pd.DataFrame, paper: pd.DataFrame):
    """The table's column groups (source, dataset, region, metric): one "ours" group per experiment with runs
    for this table (tiny, svd_xt, ...: never averaged together; plain "ours" when the whole store holds one
    experiment), each over the datasets its runs evaluated on, then the paper's. Returns (sources, columns),
    sources: experiment -> its source name."""
    if spec.metrics == ("latency_s",):
        our_datasets = [NO_DATASET]
    else:
        found = relevant[relevant.metric.isin(spec.metrics) & relevant.region.isin(spec.regions)].dataset.unique()
        our_datasets = ordered(found, DATASET_ORDER) if len(found) else ["synthetic", "real"]  # none yet
    in_store = sorted(runs.experiment.dropna().unique())
    experiments = sorted(relevant.experiment.dropna().unique()) or in_store or [None]
    sources = {e: "ours" if len(in_store) <= 1 else f"ours: {e}" for e in experiments}
    groups = [(s, our_datasets) for s in sources.values()] + [("paper", ordered(paper.dataset.unique(), DATASET_ORDER))]
    columns = [(s, d, g, m) for s, datasets in groups for d in datasets for g in spec.regions for m in spec.metrics]
    return sources, columns


def _fill_ours(table: TableResult, i: int, sub: pd.DataFrame, sources: dict) -> None:
    """Row i of our columns from its runs `sub`: mean and std over seeds, the seeds, the metric settings."""
    compared = ("eval_size",) if table.spec.metrics == ("latency_s",) else SETTINGS  # latency: the size only
    for k, (exp, source) in enumerate(sources.items()):
        mine = sub if exp is None else sub[sub.experiment == exp]
        table.seeds.iloc[i, k] = mine.seed.nunique()
        table.settings.iloc[i, k] = settings_note(mine, compared)
        for (d, g, m), group in mine.groupby(["dataset", "region", "metric"]):
            col = (source, d, g, m)
            if col in table.values.columns:
                table.values.iloc[i, table.values.columns.get_loc(col)] = group.value.mean()
                table.std.iloc[i, table.std.columns.get_loc(col)] = group.value.std(ddof=1)  # NaN for one seed


def build_table(runs: pd.DataFrame, number: str, paper: pd.DataFrame | None = None) -> TableResult:
    """Table `number` ("4" ... "10") in the paper's layout from the tidy runs of load_runs()."""
    spec = TABLES[str(number)]
    paper = paper_results.frame() if paper is None else paper
    paper = paper[paper.table == spec.number]
    rows = spec.rows + _floor_rows(spec)
    per_row = [_rows_runs(runs, r) for r in rows]
    sources, columns = _columns(spec, runs, pd.concat(per_row), paper)
    index = pd.MultiIndex.from_tuples([(r.label, r.steps, r.source) for r in rows], names=["row", "steps", "ours from"])
    values = pd.DataFrame(np.nan, index=index, columns=pd.MultiIndex.from_tuples(
        columns, names=["source", "dataset", "region", "metric"]))
    table = TableResult(spec, values, std=values[[c for c in columns if c[0] != "paper"]].copy(),
                        seeds=pd.DataFrame(0, index=index, columns=list(sources.values())), missing=[],
                        settings=pd.DataFrame("", index=index, columns=list(sources.values())))
    for i, (row, sub) in enumerate(zip(rows, per_row)):
        if row.ablation and sub.empty and not row.arm.startswith(FLOOR_PREFIX):
            table.missing.append(f"{row.source} at {row.steps} step{'' if row.steps == '1' else 's'}"
                                 if row.match_steps else row.source)
        _fill_ours(table, i, sub, sources)
        if row.paper:
            for rec in paper[(paper.row == row.paper) & (paper.steps == int(row.steps))].itertuples():
                col = ("paper", rec.dataset, rec.region, rec.metric)
                if col in values.columns:
                    values.iloc[i, values.columns.get_loc(col)] = rec.value
    return table


def build_tables(runs: pd.DataFrame) -> dict[str, TableResult]:
    return {n: build_table(runs, n) for n in TABLES}


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


def run_table(runs: pd.DataFrame, ablation: str) -> pd.DataFrame:
    """One row per finished run of an ablation and step count (arm, seed, steps), one column per test
    metric ('<dataset>/<metric>[_<region>]'): the raw numbers."""
    sub = runs[runs.ablation == ablation]
    if sub.empty:
        return pd.DataFrame()
    sub = sub.assign(key=sub.dataset + "/" + sub.metric + np.where(sub.region == "full", "", "_" + sub.region),
                     steps=sub.steps.fillna(0).astype(int))  # floors: no steps
    return sub.pivot_table(index=["experiment", "arm", "seed", "steps"], columns="key", values="value", aggfunc="first")


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
