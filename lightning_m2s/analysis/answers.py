"""Each grid's answer in words, from its logged paired differences: the top of the report."""

from __future__ import annotations

import pandas as pd

from lightning_m2s.analysis import grids
from lightning_m2s.analysis.grids import ordered
from lightning_m2s.analysis.runs import FLOOR_PREFIX, has_runs, split_by_steps
from lightning_m2s.analysis.tables import DATASET_ORDER, metric_header
from lightning_m2s.comparison import FLOOR_REFERENCE, HIGHER_IS_BETTER, unit

# How an arm stands against the classical fill floor, said of one arm and of several.
_SINGLE = {"better": "beats", "worse": "loses to", "no clear difference": "does not differ clearly from"}
_PLURAL = {"better": "beat", "worse": "lose to", "no clear difference": "do not differ clearly from"}


def not_run_line(ablation: str) -> str:
    """One line for a grid with no finished runs: what it is for and how to run it."""
    from lightning_m2s.cli import SWEEP_INFO  # its run time on the embedded default: the sweep file does not say

    tables = grids.paper_tables(ablation)
    minutes = SWEEP_INFO.get(ablation, ("", "", None))[2]
    where = f" (Table {tables})" if tables else ""
    took = f", about {minutes} min on the embedded default" if minutes else ""
    return f"`{ablation}`{where} has no finished runs: `make sweep ABLATION={ablation}`{took}."


def _verdict(d, higher_is_better: bool) -> str:
    if d.lo > 0 or d.hi < 0:
        return "better" if (d.lo > 0) == higher_is_better else "worse"
    return "no clear difference"


def _diff_text(d, unit: str) -> str:
    return f"{d['mean']:+.2f}{unit} [{d.lo:+.2f}, {d.hi:+.2f}]"


def _units(metric: str) -> str:
    return f" {unit(metric)}" if unit(metric) else ""


def _means_text(mine: pd.DataFrame, metric: str) -> str:
    """Without logged differences: each arm's mean per test set, said to be without intervals."""
    full = split_by_steps(mine[(mine.metric == metric) & (mine.region == "full")])
    means = full.groupby(["dataset", "arm"]).value.mean()  # (dataset, arm) -> mean over seeds
    parts = [f"on {d}: " + ", ".join(f"{a} {v:.2f}{_units(metric)}" for a, v in means[d].items())
             for d in ordered(means.index.get_level_values(0).unique(), DATASET_ORDER)]
    return (f"): mean {metric_header(metric).rsplit(' ', 1)[0]} " + "; ".join(parts)
            + " (no paired differences logged: the sweep logs them with its table when the grid finishes).")


def _pair_sentences(sub: pd.DataFrame, datasets: list[str], higher: bool, u: str) -> list[str]:
    """One sentence per arm - reference comparison, a clause per test set."""
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
    return sentences


def _floor_sentences(sub: pd.DataFrame, datasets: list[str], higher: bool, u: str) -> list[str]:
    """One sentence per test set: how every arm stands against the classical fill floor."""
    floor = sub[sub.against == FLOOR_REFERENCE]
    sentences = []
    for d in datasets:
        rows = floor[floor.dataset == d]
        if rows.empty:
            continue
        verdicts = {r.arm: _verdict(r, higher) for r in rows.itertuples()}
        numbers = ", ".join(f"{r.arm} {_diff_text(r, u)}" for _, r in rows.iterrows())
        if len(set(verdicts.values())) == 1:
            verdict = next(iter(verdicts.values()))
            who = {1: f"{next(iter(verdicts))} {_SINGLE[verdict]}", 2: f"both arms {_PLURAL[verdict]}"}.get(
                len(verdicts), f"all arms {_PLURAL[verdict]}")
            sentences.append(f"On {d}, {who} the classical fill floor ({numbers}).")
        else:
            each = "; ".join(f"{a} {_SINGLE[v]} it" for a, v in verdicts.items())
            sentences.append(f"On {d}, against the classical fill floor: {each} ({numbers}).")
    return sentences


def answer(runs: pd.DataFrame, diffs: pd.DataFrame, ablation: str, metric: str = "psnr") -> str | None:
    """The grid's answer in words, from its logged paired differences (treatment − reference, 95% interval):
    which arm is better on each test set and by how much, then how every arm stands against the classical
    fill floor. None when the grid has no finished runs."""
    if not has_runs(runs, ablation):
        return None
    sub = diffs[(diffs.ablation == ablation) & (diffs.metric == metric)]
    mine = runs[(runs.ablation == ablation) & ~runs.arm.str.startswith(FLOOR_PREFIX)]
    seeds = int(mine.groupby("arm").seed.nunique().max())
    head = f"**{ablation}** ({', '.join(sorted(mine.experiment.dropna().unique()))}, {seeds} seed{'s' * (seeds > 1)}"
    if sub.empty:  # no logged comparison: the means, without intervals
        return head + _means_text(mine, metric)
    higher, u = HIGHER_IS_BETTER[metric], _units(metric)
    datasets = ordered(sub.dataset.unique(), DATASET_ORDER)
    sentences = _pair_sentences(sub, datasets, higher, u) + _floor_sentences(sub, datasets, higher, u)
    clips = ", ".join(f"{int(sub[sub.dataset == d].clips.max())} {d}" for d in datasets)
    return (f"{head}; {metric_header(metric).rsplit(' ', 1)[0]}, treatment − reference, paired over the same test "
            f"clips ({clips}), 95% bootstrap interval): " + " ".join(sentences))


def answers(runs: pd.DataFrame, diffs: pd.DataFrame, ablations=None) -> str:
    """Markdown for the top of the report: each finished grid's answer in one paragraph, then one line per grid
    not run yet (how to run it). `ablations`: the sweeps to answer (None: every sweep file's)."""
    ablations = grids.sweep_names() if ablations is None else ablations
    done = [a for a in ablations if has_runs(runs, a)]
    lines = [answer(runs, diffs, a) for a in done if grids.arms(a)]
    lines += [f"**{a}**: finished runs in the tables below (a search, no paired answer)." for a in done
              if not grids.arms(a)]
    todo = [not_run_line(a) for a in ablations if a not in done]
    text = "\n\n".join(lines) if lines else "No grid has finished runs in this store yet."
    return text + ("\n\n**Not run yet** (their sections below show the paper's numbers only):\n\n- " + "\n- ".join(todo)
                   if todo else "")
