"""Tables 4-10 and plots from a small MLflow store filled by hand in the sweeps' exact format.

`fill_store` writes trial runs as `sweep.run_sweep` does (parent run per sweep, child run per trial with the
m2s.* tags, final `test/...` metrics, `qualitative/<dataset>_clip0.npz`); `SCENARIO` is a small set with two
seeds, missing arms, a failed run, a running run and a superseded re-run. test_notebook.py reuses both.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure

from lightning_m2s import analysis, comparison, paper_results, tracking

DATASETS = ("synthetic", "real")
_LEFT = "Cond. with V_r^warp + M_r^occ + V_l"
_WARP = "Cond. with V_r^warp + M_r^occ"
TINY_SETTINGS = {"lpips_net": "alex", "ms_ssim": "per_frame", "eval_size": "64"}  # the embedded default's


def _one_count(base: float, seed: int, prefix: str = "") -> dict[str, float]:
    m = {f"test/{prefix}latency_s": 1.0 + base / 10 + seed / 10}
    for k, d in enumerate(DATASETS):
        psnr = 20 + base + seed - 2 * k
        m.update({f"test/{d}/{prefix}{name}": v for name, v in {
            "psnr": psnr, "psnr_inside": psnr + 10, "psnr_outside": psnr + 1,
            "ms_ssim": 0.8 + base / 100 + seed / 100, "ms_ssim_inside": 0.95,
            "ms_ssim_outside": 0.85, "lpips": 0.3 - base / 100 - seed / 100,
            "lpips_inside": 0.02, "lpips_outside": 0.25, "temporal_error": 0.01}.items()})
    return m


def fake_metrics(base, seed: int, steps) -> dict[str, float]:
    """Final test metrics as the training code logs them; `base` orders the arms (higher is better). With
    lists (one model tested at several step counts, a base per count): `test/<dataset>/steps<N>/...` for each
    count and the plain names for the first, as the module logs them."""
    if not isinstance(steps, list):
        return {"test/steps": float(steps), **_one_count(base, seed)}
    m = {"test/steps": float(steps[0]), **_one_count(base[0], seed)}
    for b, n in zip(base, steps):
        m.update(_one_count(b, seed, f"steps{n}/"))
    return m


def fake_frame(value: int, size: int = 8) -> dict[str, np.ndarray]:
    """A qualitative npz's arrays: inputs and ground truth constant, `output` filled with `value`."""
    img = lambda v: np.full((size, size, 3), v, np.uint8)  # noqa: E731
    mask = np.zeros((size, size), np.uint8)
    mask[:, : size // 4] = 255
    return {"left": img(10), "warped": img(20), "mask": mask, "output": img(value), "right": img(200)}


# (ablation, arm, seed, base, steps, status); the first with_left seed-0 run is superseded by the later one.
SCENARIO = [
    ("left_cond", "with_left", 0, 40.0, 1, "FINISHED"),  # older re-run: must not count
    ("left_cond", "with_left", 0, 2.0, 1, "FINISHED"),
    ("left_cond", "with_left", 1, 2.0, 1, "FINISHED"),
    ("left_cond", "without_left", 0, 1.0, 1, "FINISHED"),
    ("left_cond", "without_left", 1, 50.0, 1, "FAILED"),
    ("left_cond", "without_left", 2, 60.0, 1, "RUNNING"),
    ("full_attention", "with_full_attention", 0, 2.2, 1, "FINISHED"),
    ("full_attention", "with_full_attention", 1, 2.2, 1, "FINISHED"),
    ("loss", "A_B_standard", 0, [1.5, 0.5], [25, 1], "FINISHED"),  # one model: rows A (25 steps) and B (1)
    ("loss", "D_end_to_end", 0, 3.0, 1, "FINISHED"),
    ("loss", "D_end_to_end", 1, 3.0, 1, "FINISHED"),
    ("inference_steps", "standard", 0, [0.5, 1.0, 1.5], [1, 5, 25], "FINISHED"),
    ("inference_steps", "end_to_end", 0, [3.0, 2.0], [1, 5], "FINISHED"),
    ("inference_steps", "end_to_end", 1, 3.0, 1, "FINISHED"),
    ("runtime", "without_full_attention", 0, 1.0, 1, "FINISHED"),
    ("runtime", "with_full_attention", 0, 2.0, 1, "FINISHED"),
    ("runtime", "with_full_attention", 1, 2.0, 1, "FINISHED"),
    ("baselines", "warp_only", 0, -5.0, 0, "FINISHED"),
    ("baselines", "m2svid", 0, 3.0, 1, "FINISHED"),
    ("hparams", "trial0", 0, 1.0, 1, "FINISHED"),
    ("hparams", "trial1", 0, 2.0, 1, "FINISHED"),
]
# Runs that carry a qualitative npz for the synthetic set, with the value their `output` is filled with.
QUALITATIVE = {("left_cond", "with_left", 0): 100, ("left_cond", "without_left", 0): 50}


def log_trial(client, exp_id: str, parent_id: str, ablation: str, arm: str, seed: int, metrics: dict[str, float],
              status: str = "FINISHED", qualitative: dict[str, dict] | None = None, experiment: str = "tiny",
              start_time: int | None = None, workdir: Path | None = None, settings: dict | None = None) -> str:
    """One child trial run with the sweep's tags, final metrics, optional npz artifacts; returns its id."""
    from mlflow.entities import Metric

    study = ablation if experiment == "tiny" else f"{ablation}-{experiment}"
    run = client.create_run(exp_id, run_name=f"{arm}-seed{seed}", start_time=start_time, tags={
        "mlflow.parentRunId": parent_id, "m2s.kind": "trial", "m2s.ablation": ablation, "m2s.arm": arm,
        "m2s.seed": str(seed), "m2s.study": study, "m2s.experiment": experiment, "m2s.trial": "0",
        "m2s.git_commit": "test", **{f"m2s.metrics.{k}": v for k, v in (settings or TINY_SETTINGS).items()}})
    run_id = run.info.run_id
    client.log_batch(run_id, metrics=[Metric(k, v, 0, 0) for k, v in metrics.items()])
    for dataset, arrays in (qualitative or {}).items():
        path = Path(workdir) / run_id / f"{dataset}_clip0.npz"
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(path, **arrays)
        client.log_artifact(run_id, str(path), "qualitative")
    client.set_terminated(run_id, status=status)
    return run_id


def fill_store(root: Path, scenario=SCENARIO, qualitative=QUALITATIVE) -> str:
    """A sqlite MLflow store under `root` holding `scenario` as sweeps write it; returns its URI."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = tracking.client(uri)
    parents = {}
    for clock, (ablation, arm, seed, base, steps, status) in enumerate(scenario):
        if ablation not in parents:
            exp_id = tracking.experiment_id(client, f"sweep-{ablation}", artifact_root=str(root / "artifacts"))
            parent = client.create_run(exp_id, run_name=ablation, tags={
                "m2s.kind": "sweep", "m2s.study": ablation, "m2s.ablation": ablation, "m2s.experiment": "tiny",
                **{f"m2s.metrics.{k}": v for k, v in TINY_SETTINGS.items()}})
            # A number on the parent must never reach a table (only trials count).
            client.log_metric(parent.info.run_id, "test/synthetic/psnr", 999.0)
            parents[ablation] = exp_id, parent.info.run_id
        exp_id, parent_id = parents[ablation]
        value = qualitative.get((ablation, arm, seed))
        log_trial(client, exp_id, parent_id, ablation, arm, seed, fake_metrics(base, seed, steps), status,
                  qualitative={"synthetic": fake_frame(value)} if value is not None else None,
                  start_time=1_700_000_000_000 + 1000 * clock, workdir=root / "staging")
    return uri


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    return fill_store(tmp_path_factory.mktemp("mlflow"))


@pytest.fixture(scope="module")
def runs(store) -> pd.DataFrame:
    return analysis.load_runs(store)


def ours(table, source="ours"):
    return table.values[source]


# ---------------------------------------------------------------- loading


@pytest.mark.parametrize("key, expected", [
    ("test/real/psnr", ("real", "full", "psnr", None)),
    ("test/synthetic/ms_ssim_inside", ("synthetic", "inside", "ms_ssim", None)),
    ("test/stereo4d/lpips_outside", ("stereo4d", "outside", "lpips", None)),
    ("test/real/temporal_error", ("real", "full", "temporal_error", None)),
    ("test/latency_s", ("all", "full", "latency_s", None)),
    ("test/steps", ("all", "full", "steps", None)),
    ("test/synthetic/steps5/psnr_inside", ("synthetic", "inside", "psnr", 5)),
    ("test/steps25/latency_s", ("all", "full", "latency_s", 25)),
    ("train/loss", None),
    ("val/real/psnr", None),
    ("val/real/steps5/psnr", None),
])
def test_parse_metric(key, expected):
    assert analysis.parse_metric(key) == expected


def test_load_runs_keeps_finished_trials_only(runs, store):
    assert list(runs.columns) == analysis.TIDY_COLUMNS
    assert (runs.value != 999.0).all(), "a sweep (parent) run's metric leaked into the trials"
    overview = analysis.run_overview(store)
    failed = overview[overview.status != "FINISHED"].run_id
    assert len(failed) == 2 and not runs.run_id.isin(failed).any()
    assert set(runs[runs.arm == "without_left"].seed) == {0}
    # with_left seed 0 was run twice: only the newer run (base 2 -> synthetic PSNR 22) counts.
    psnr = runs[(runs.arm == "with_left") & (runs.seed == 0) & (runs.dataset == "synthetic")
                & (runs.metric == "psnr") & (runs.region == "full")]
    assert psnr.value.tolist() == [22.0]
    assert set(runs.ablation) == {a for a, *_ in SCENARIO}


def test_status_counts(store):
    counts = analysis.status_counts(analysis.run_overview(store))
    row = counts.loc[("tiny", "left_cond", "without_left")]
    assert (row["FINISHED"], row["FAILED"], row["RUNNING"]) == (1, 1, 1)
    assert counts.loc[("tiny", "left_cond", "with_left"), "FINISHED"] == 3  # the superseded run still exists


def test_load_runs_reads_each_step_count_of_one_model(runs):
    """A model tested at 25 and 1 steps: its steps<N> metrics, each with its count; the plain names (a
    repeat of the first count) are not counted twice."""
    full = runs[runs.region == "full"]
    ab = full[(full.arm == "A_B_standard") & (full.dataset == "real") & (full.metric == "psnr")]
    assert sorted(zip(ab.steps, ab.value)) == [(1.0, 18.5), (25.0, 19.5)]
    latency = runs[(runs.arm == "A_B_standard") & (runs.metric == "latency_s")]
    assert sorted(latency.steps) == [1.0, 25.0]
    one = runs[(runs.arm == "D_end_to_end") & (runs.metric == "psnr")]
    assert set(one.steps) == {1.0}  # a single count: test/steps says which
    assert set(runs[runs.arm == "D_end_to_end"].lpips_net) == {"alex"}  # the run's metric settings


def test_run_table_one_row_per_run_and_step_count(runs):
    t = analysis.run_table(runs, "loss")
    assert len(t) == 4  # A_B_standard at 25 and at 1 step, D_end_to_end seeds 0 and 1
    assert t.loc[("tiny", "D_end_to_end", 1, 1), "real/psnr"] == pytest.approx(20 + 3 + 1 - 2)
    assert t.loc[("tiny", "A_B_standard", 0, 25), "synthetic/lpips_inside"] == pytest.approx(0.02)
    assert t.loc[("tiny", "A_B_standard", 0, 1), "synthetic/psnr"] == pytest.approx(20.5)


# ---------------------------------------------------------------- tables


def test_table4_mean_spread_and_missing(runs):
    t = analysis.build_table(runs, "4")
    assert set(t.values.columns.get_level_values("source")) == {"ours", "paper"}
    assert set(ours(t).columns.get_level_values("dataset")) == {"synthetic", "real"}
    with_left = (_LEFT, "1", "left_cond/with_left")
    # seeds 0 and 1 of base 2: synthetic PSNR 22 and 23, real 20 and 21.
    assert t.values.loc[with_left, ("ours", "synthetic", "full", "psnr")] == pytest.approx(22.5)
    assert t.values.loc[with_left, ("ours", "real", "full", "psnr")] == pytest.approx(20.5)
    assert t.std.loc[with_left, ("ours", "synthetic", "full", "psnr")] == pytest.approx(math.sqrt(0.5))
    assert t.seeds.loc[with_left, "ours"] == 2
    without = (_WARP, "1", "left_cond/without_left")  # seed 1 failed: one seed, no spread
    assert t.values.loc[without, ("ours", "synthetic", "full", "psnr")] == pytest.approx(21.0)
    assert math.isnan(t.std.loc[without, ("ours", "synthetic", "full", "psnr")])
    assert t.seeds.loc[without, "ours"] == 1
    # No 25-step runs and no without_full_attention arm: missing, never filled in.
    for row in [(_WARP, "25", "left_cond_diffusion/without_left"), (_LEFT, "25", "left_cond_diffusion/with_left"),
                (_LEFT, "1", "full_attention/without_full_attention")]:
        assert ours(t).loc[row].isna().all()
    assert t.missing == ["left_cond_diffusion/without_left at 25 steps", "left_cond_diffusion/with_left at 25 steps",
                         "full_attention/without_full_attention at 1 step"]
    full = ("+full attention", "1", "full_attention/with_full_attention")
    assert t.values.loc[full, ("ours", "synthetic", "full", "lpips")] == pytest.approx(0.3 - 0.022 - 0.005)
    # The paper's numbers beside ours, on the paper's datasets.
    assert t.values.loc[with_left, ("paper", "stereo4d", "full", "psnr")] == 26.2
    warp25 = (_WARP, "25", "left_cond_diffusion/without_left")
    assert t.values.loc[warp25, ("paper", "ego4d", "full", "ms_ssim")] == 0.822
    assert t.values.loc[full, ("paper", "ego4d", "full", "lpips")] == 0.248
    ours_only = t.values.index.get_level_values("row").str.startswith(analysis.FLOOR_PREFIX)  # the grid's floors
    assert t.values["paper"][~ours_only].notna().all().all()


def test_table_display_marks_missing_and_spread(runs):
    shown = analysis.build_table(runs, "4").display()
    with_left = (_LEFT, "1", "left_cond/with_left")
    assert shown.loc[with_left, ("ours", "synthetic", "full", "psnr")] == "22.50 ± 0.71"
    assert shown.loc[(_WARP, "1", "left_cond/without_left"), ("ours", "synthetic", "full", "psnr")] == "21.00"
    assert shown.loc[(_WARP, "25", "left_cond_diffusion/without_left"), ("ours", "real", "full", "lpips")] == "—"
    assert shown.loc[with_left, ("paper", "stereo4d", "full", "psnr")] == "26.2"
    assert shown.loc[with_left, ("paper", "ego4d", "full", "ms_ssim")] == "0.886"
    assert shown.loc[with_left, ("ours", "seeds", "", "")] == "2"
    assert shown.columns[0] == ("ours", "seeds", "", "") and shown.columns[-1][0] == "paper"


def test_table7_and_8_have_inside_regions(runs):
    t7 = analysis.build_table(runs, "7")
    assert set(t7.values.columns.get_level_values("region")) == {"full", "inside"}
    row = (_LEFT, "1", "left_cond/with_left")
    assert t7.values.loc[row, ("ours", "synthetic", "inside", "psnr")] == pytest.approx(32.5)
    assert t7.values.loc[row, ("paper", "stereo4d", "inside", "lpips")] == 0.009
    t8 = analysis.build_table(runs, "8")
    b = ("B Standard loss (1)", "1", "loss/A_B_standard")
    assert t8.values.loc[b, ("paper", "ego4d", "inside", "psnr")] == 31.5
    assert t8.missing == ["loss/C_latent"]


def test_table5_rows(runs):
    t = analysis.build_table(runs, "5")
    a = ("A Standard loss (1)", "25", "loss/A_B_standard")
    assert t.values.loc[a, ("ours", "real", "full", "psnr")] == pytest.approx(19.5)
    b = ("B Standard loss (1)", "1", "loss/A_B_standard")  # the same run, tested at 1 step
    assert t.values.loc[b, ("ours", "real", "full", "psnr")] == pytest.approx(18.5)
    assert t.values.loc[a, ("paper", "stereo4d", "full", "lpips")] == 0.215
    assert ours(t).loc[("C L_latent (2)", "1", "loss/C_latent")].isna().all()
    assert t.values.loc[("C L_latent (2)", "1", "loss/C_latent"), ("paper", "ego4d", "full", "lpips")] == 0.318


def test_table6_baselines_full_inside_outside(runs):
    t = analysis.build_table(runs, "6")
    assert set(t.values.columns.get_level_values("region")) == {"full", "inside", "outside"}
    assert set(t.values["paper"].columns.get_level_values("dataset")) == {"stereo4d"}
    m2svid = ("M2SVid (Ours)", "1", "baselines/m2svid")
    assert t.values.loc[m2svid, ("ours", "synthetic", "outside", "psnr")] == pytest.approx(24.0)
    assert t.values.loc[m2svid, ("paper", "stereo4d", "outside", "lpips")] == 0.161
    svg = ("SVG", "50", "—")  # the paper's baseline: no runs of ours, none expected
    assert ours(t).loc[svg].isna().all() and t.values.loc[svg, ("paper", "stereo4d", "full", "ms_ssim")] == 0.926
    warp = ("Warp only (holes left)", "—", "baselines/warp_only")
    assert t.values.loc[warp, ("ours", "synthetic", "full", "psnr")] == pytest.approx(15.0)
    assert t.values.loc[warp, "paper"].isna().all()
    assert t.missing == ["baselines/classical_fill"]


def test_table9_latency(runs):
    t = analysis.build_table(runs, "9")
    with_fa = ("with full attention on the disoccluded regions", "1", "runtime/with_full_attention")
    assert t.values.loc[with_fa, ("ours", "all", "full", "latency_s")] == pytest.approx(1.25)
    assert t.values.loc[with_fa, ("paper", "all", "full", "latency_s")] == 2.1
    without = ("without full attention on the disoccluded regions", "1", "runtime/without_full_attention")
    assert t.values.loc[without, ("paper", "all", "full", "latency_s")] == 2.0


def test_table10_steps(runs):
    t = analysis.build_table(runs, "10")
    assert set(t.values.columns.get_level_values("metric")) == {"lpips"}
    e2e = "Fixed t=T · L_latent + L_LPIPS + L_L1"
    one = (e2e, "1", "inference_steps/end_to_end")
    assert t.values.loc[one, ("ours", "real", "full", "lpips")] == pytest.approx(0.265)  # seeds 0 and 1
    five = (e2e, "5", "inference_steps/end_to_end")
    assert t.values.loc[five, ("ours", "real", "full", "lpips")] == pytest.approx(0.28)
    standard = "Sampling t · L_latent"
    assert t.values.loc[(standard, "25", "inference_steps/standard"), ("ours", "synthetic", "full", "lpips")] == \
        pytest.approx(0.3 - 0.015)  # one model's 25-step numbers
    assert t.values.loc[(e2e, "25", "inference_steps/end_to_end"), ("paper", "stereo4d", "full", "lpips")] == 0.243
    assert t.missing == ["inference_steps/end_to_end at 25 steps"]


def test_steps_decide_the_row_for_left_cond(tmp_path):
    """The 25-step rows come from the standard diffusion grid tested at [25, 1]: its 25-step numbers, not
    its 1-step ones; the 1-step rows stay the end-to-end left_cond grid's."""
    uri = fill_store(tmp_path, qualitative={}, scenario=[
        ("left_cond_diffusion", "with_left", 0, [1.0, 4.0], [25, 1], "FINISHED"),
        ("left_cond", "with_left", 0, 2.0, 1, "FINISHED")])
    t = analysis.build_table(analysis.load_runs(uri), "4")
    col = ("ours", "synthetic", "full", "psnr")
    assert t.values.loc[(_LEFT, "25", "left_cond_diffusion/with_left"), col] == pytest.approx(21.0)
    assert t.values.loc[(_LEFT, "1", "left_cond/with_left"), col] == pytest.approx(22.0)


def test_rows_measured_otherwise_than_the_paper_are_marked(runs):
    """Our runs with the embedded default's metric settings carry what differs from the paper's; runs
    measured as the paper (VGG LPIPS, released MS-SSIM, 512 px) carry nothing."""
    paper_like = runs[runs.ablation == "loss"].assign(experiment="svd_xt", lpips_net="vgg", ms_ssim="released",
                                                       eval_size="512")
    t = analysis.build_table(pd.concat([runs, paper_like]), "5")
    d = ("D L_latent + L_LPIPS + L_L1 (5)", "1", "loss/D_end_to_end")
    assert t.settings.loc[d, "ours: tiny"] == "LPIPS alex, MS-SSIM per_frame, 64 px"
    assert t.settings.loc[d, "ours: svd_xt"] == ""
    shown = t.display()
    assert shown.loc[d, ("ours: tiny", analysis.OTHER_SETTINGS, "", "")] == "LPIPS alex, MS-SSIM per_frame, 64 px"
    assert "other metric settings than the paper's" in t.note()
    assert t.settings.loc[("C L_latent (2)", "1", "loss/C_latent"), "ours: tiny"] == ""  # no runs: nothing to mark
    latency = analysis.build_table(runs, "9")  # latency depends on the frame size only
    assert set(latency.settings["ours"]) <= {"", "64 px"}
    untagged = runs.assign(lpips_net=None)
    assert analysis.build_table(untagged, "5").settings.loc[d, "ours"] == "not recorded"


def test_several_experiments_stay_apart(runs):
    other = runs[runs.ablation == "loss"].assign(experiment="svd_xt")
    other.loc[other.metric == "psnr", "value"] += 100
    t = analysis.build_table(pd.concat([runs, other]), "5")
    assert set(t.values.columns.get_level_values("source")) == {"ours: tiny", "ours: svd_xt", "paper"}
    d = ("D L_latent + L_LPIPS + L_L1 (5)", "1", "loss/D_end_to_end")
    assert t.values.loc[d, ("ours: tiny", "synthetic", "full", "psnr")] == pytest.approx(23.5)
    assert t.values.loc[d, ("ours: svd_xt", "synthetic", "full", "psnr")] == pytest.approx(123.5)
    t4 = analysis.build_table(pd.concat([runs, other]), "4")  # svd_xt has no runs for Table 4
    assert set(t4.values.columns.get_level_values("source")) == {"ours: tiny", "paper"}


def test_no_runs_gives_tables_of_missing(store):
    runs = analysis.load_runs(store, ablations=("no_such_sweep",))  # as a store without the sweeps' experiments
    assert runs.empty and list(runs.columns) == analysis.TIDY_COLUMNS
    for number, table in analysis.build_tables(runs).items():
        assert ours(table).isna().all().all(), number
        assert table.values["paper"].notna().any().any(), number
        assert len(table.missing) == sum(r.ablation is not None for r in table.spec.rows)
        assert "—" in table.display().to_numpy()


# ---------------------------------------------------------------- paper numbers


def test_paper_numbers_labelled_and_complete():
    paper = paper_results.frame()
    assert set(paper.source) == {"paper"}
    assert set(paper.table) == {"4", "5", "6", "7", "8", "9", "10"}
    assert set(paper.dataset) == {"stereo4d", "ego4d", "all"}
    assert set(paper.region) == {"full", "inside", "outside"}
    assert not paper.duplicated(["table", "row", "steps", "dataset", "region", "metric"]).any()
    assert len(paper) == 10 * 3 + 8 * 3 + 12 * 3 + 20 * 3 + 16 * 3 + 2 + 12


def test_paper_numbers_agree_across_tables():
    """The paper repeats rows between tables: a typo in one copy shows up here."""
    values = {(r["table"], r["row"], r["steps"], r["dataset"], r["region"], r["metric"]): r["value"]
              for r in paper_results.records()}

    def group(table, row=None, steps=None, region="full", metric=None):
        return {(k[1], k[2], k[3], k[5]) if row is None else (k[3], k[5]): v for k, v in values.items()
                if k[0] == table and k[4] == region and row in (None, k[1]) and steps in (None, k[2])
                and metric in (None, k[5])}

    assert group("4") == group("7") and len(group("4")) == 30
    assert group("5") == group("8") and len(group("5")) == 24
    # Table 5's A and D are Table 4's "+ V_l" rows at 25 and 1 steps; Table 10's ends are B, A and D.
    assert group("5", "A", 25) == group("4", "warp+mask+left", 25)
    assert group("5", "D", 1) == group("4", "warp+mask+left", 1)
    assert group("10", "sampled t", 1) == group("5", "B", 1, metric="lpips")
    assert group("10", "sampled t", 25) == group("5", "A", 25, metric="lpips")
    assert group("10", "fixed t=T", 1) == group("5", "D", 1, metric="lpips")
    stereo4d = {k: v for k, v in group("4", "+full attention", 1).items() if k[0] == "stereo4d"}
    assert group("6", "M2SVid", 1) == stereo4d


# ---------------------------------------------------------------- plots


def _texts(fig: Figure) -> list[str]:
    return [t.get_text() for ax in fig.axes for t in ax.texts]


def _means(ax) -> list[float]:
    """The arms' mean markers of a plot_ablation / plot_latency axis."""
    return [float(line.get_ydata()[0]) for line in ax.lines if line.get_marker() == "s"]


def test_plot_ablation_bars_seeds_and_missing(runs):
    fig = analysis.plot_ablation(runs, "full_attention")
    assert isinstance(fig, Figure) and len(fig.axes) == 2 * 4  # datasets x (psnr, ms_ssim, lpips, temporal)
    ax = fig.axes[0]  # synthetic PSNR
    assert _means(ax) == pytest.approx([22.7])  # one arm has runs: mean of 22.2 and 23.2
    assert ax.get_ylim()[0] > 20  # the axis fits the values: a PSNR axis from 0 flattens every difference
    assert "(dB) ↑" in ax.get_title()
    marker = next(line for line in ax.lines if line.get_marker() == "s")
    assert marker.get_color() == comparison.colors(["with_full_attention", "without_full_attention"])["with_full_attention"]
    assert "missing" in [t.get_text() for t in ax.texts]  # without_full_attention
    assert len(ax.lines[-1].get_ydata()) == 2  # a dot per seed
    assert "no finished runs" in _texts(analysis.plot_ablation(runs.iloc[:0], "loss"))[0]
    fig = analysis.plot_ablation(runs, "loss", metrics=("psnr",))  # one model tested at 25 and 1 steps: two bars
    labels = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert labels[:2] == ["A_B_standard @ 1", "A_B_standard @ 25"]
    assert _means(fig.axes[0])[:2] == pytest.approx([20.5, 21.5])


def test_plot_inference_steps_and_latency(runs):
    fig = analysis.plot_inference_steps(runs)
    assert len(fig.axes) == 3  # synthetic, real, paper
    assert "end_to_end at 25 steps" in fig.get_suptitle()  # the missing step count is named
    lines = fig.axes[0].lines
    assert any(list(line.get_xdata()) == [1, 5, 25] for line in lines)  # the standard regime's three points
    paper_ax = fig.axes[-1]
    assert any(list(line.get_ydata()) == [0.179, 0.200, 0.243] for line in paper_ax.lines)
    fig = analysis.plot_latency(runs)
    ours_ax, paper_ax = fig.axes
    assert _means(ours_ax) == pytest.approx([1.1, 1.25])
    assert _means(paper_ax) == pytest.approx([2.0, 2.1])
    paper_only = analysis.plot_latency(runs[runs.ablation != "runtime"])  # no runtime runs: the paper's panel only
    assert len(paper_only.axes) == 1 and _means(paper_only.axes[0]) == pytest.approx([2.0, 2.1])


def test_plot_qualitative_uses_the_artifacts(runs, store):
    fig = analysis.plot_qualitative(runs, "left_cond", store, datasets=["synthetic"])
    axes = fig.axes
    assert [ax.get_title() for ax in axes] == ["left", "warped", "mask", "without_left", "with_left",
                                              "right (ground truth)"]
    shown = [np.asarray(ax.images[0].get_array()) if ax.images else None for ax in axes]
    assert (shown[0] == 10).all() and (shown[5] == 200).all()
    assert (shown[3] == 50).all() and (shown[4] == 100).all()  # each arm's own output
    assert shown[2][:, :2].all() and not shown[2][:, 2:].any()  # mask
    fig = analysis.plot_qualitative(runs, "loss", store, datasets=["synthetic"])  # no npz logged
    assert all(not ax.images for ax in fig.axes) and _texts(fig).count("missing") == len(fig.axes)


def test_floors_and_paired_differences_join_the_tables_and_plots(tmp_path):
    import json

    from matplotlib.figure import Figure

    uri = fill_store(tmp_path, scenario=[("left_cond", "with_left", 0, 1.0, 1, "FINISHED"),
                                         ("left_cond", "without_left", 0, 0.0, 1, "FINISHED")], qualitative={})
    client = tracking.client(uri)
    exp = client.get_experiment_by_name("sweep-left_cond")
    (parent,) = client.search_runs([exp.experiment_id], "tags.`m2s.kind` = 'sweep'")
    client.log_metric(parent.info.run_id, "floor/classical_fill/test/synthetic/psnr", 28.25)
    client.log_metric(parent.info.run_id, "floor/warp_only/test/synthetic/psnr", 25.5)
    diff = {"label": "without_left - with_left", "arm": "without_left", "against": "with_left", "dataset": "synthetic",
            "metric": "psnr", "mean": -0.4, "lo": -0.6, "hi": -0.2, "clips": 16, "seeds": 1, "excludes_zero": True}
    tracking.log_json_artifact(client, parent.info.run_id, {"differences": [diff]}, "comparison", "comparison.json")

    runs = analysis.load_runs(uri)
    table = analysis.build_table(runs, "4")
    psnr = table.values[("ours", "synthetic", "full", "psnr")]
    assert psnr[("floor: classical fill", "—", "left_cond/floor: classical_fill")] == 28.25
    assert psnr[("floor: warp only", "—", "left_cond/floor: warp_only")] == 25.5
    assert not any("floor" in m for m in table.missing)
    fig = analysis.plot_ablation(runs, "left_cond", metrics=("psnr",))
    labels = [t.get_text() for ax in fig.axes for t in ax.get_xticklabels()]
    assert "floor: classical_fill" in labels

    diffs = analysis.load_differences(uri)
    # logged as reference - treatment (the grid's first arm was the reference): read as treatment - reference
    row = json.loads(diffs.to_json(orient="records"))[0]
    assert (row["arm"], row["against"], row["mean"], row["lo"], row["hi"]) == ("with_left", "without_left", 0.4, 0.2, 0.6)
    shown = analysis.differences_table(diffs, "left_cond")
    assert shown.iloc[0, 0] == "+0.40 [+0.20, +0.60] *"
    assert shown.index[0] == ("tiny", "with_left − without_left") and shown.columns[0][1] == "ΔPSNR (dB) ↑"
    assert isinstance(analysis.plot_differences(diffs, "left_cond"), Figure)
    # the baselines grid has an arm named as the floor: arm - classical fill stays the floor comparison
    floor_row = {**diff, "label": "warp_only - classical_fill", "arm": "warp_only", "against": "classical_fill"}
    assert analysis.treatment_first(floor_row, "baselines") == floor_row
    arm_row = {**diff, "arm": "classical_fill", "against": "warp_only"}
    both = pd.DataFrame([{"experiment": "tiny", "ablation": "baselines", **r} for r in (floor_row, arm_row, arm_row)])
    assert isinstance(analysis.plot_differences(both, "baselines"), Figure)  # a repeated row is drawn once


def _diff(arm, against, dataset, mean, lo, hi):
    return {"experiment": "tiny", "ablation": "left_cond", "label": f"{arm} - {against}", "arm": arm,
            "against": against, "dataset": dataset, "metric": "psnr", "mean": mean, "lo": lo, "hi": hi, "clips": 12,
            "seeds": 1, "excludes_zero": lo > 0 or hi < 0}


def test_the_answers_come_first_in_words_from_the_numbers(runs):
    diffs = pd.DataFrame([_diff("with_left", "without_left", "synthetic", 0.72, 0.31, 1.10),
                          _diff("with_left", "without_left", "real", 0.05, -0.20, 0.30),
                          _diff("with_left", "classical_fill", "real", -1.20, -1.50, -0.90),
                          _diff("without_left", "classical_fill", "real", -1.25, -1.60, -0.90)])
    text = analysis.answer(runs, diffs, "left_cond")
    assert "on synthetic, with_left is better than without_left by +0.72 dB [+0.31, +1.10]" in text
    assert "on real, no clear difference between with_left and without_left (+0.05 dB [-0.20, +0.30])" in text
    assert "On real, both arms lose to the classical fill floor (with_left -1.20 dB [-1.50, -0.90]" in text
    everything = analysis.answers(runs, diffs)
    assert everything.index("**left_cond**") < everything.index("Not run yet")
    # a grid with no finished runs: one line saying how to run it (and how long it takes)
    assert "`left_cond_diffusion` (Table 4, 7) has no finished runs: `make sweep ABLATION=left_cond_diffusion`" in everything
    # no logged differences: the means, said to be without intervals
    assert "full_attention** (tiny, 2 seeds): mean PSNR (dB) on synthetic: with_full_attention 22.70 dB" in everything


def test_table_html_spans_groups_labels_every_row_and_fits_by_region(runs):
    html = analysis.build_table(runs, "4").html()
    assert "V<sub>r</sub><sup>warp</sup> + M<sub>r</sub><sup>occ</sup>" in html  # the paper's notation, typeset
    assert "V_r^warp" not in html
    assert re.search(r'<th[^>]*colspan="\d+"[^>]*>ours</th>', html)  # "ours" spans its columns
    assert html.count("full_attention/without_full_attention") == 1  # a row of its own, labelled
    assert "PSNR (dB) ↑" in html and "LPIPS ↓" in html
    six = analysis.build_table(runs, "6").html()
    assert [c in six for c in ("Full frame", "Inside the disocclusion mask", "Outside the disocclusion mask")] == [True] * 3
    assert "* measured with LPIPS alex" in six  # the metric settings as a footnote, not a column of text
