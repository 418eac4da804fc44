"""Paired bootstrap differences and the grid's comparison table."""

import numpy as np

from lightning_m2s.comparison import datasets_of, differences, format_comparison, means
from lightning_m2s.stats import paired_difference, per_clip_matrix


def rows(values: dict[str, list[float]], metric_offsets=None) -> list[dict]:
    """Per-clip rows: {dataset: [psnr per clip]} -> rows with psnr, lpips, psnr_inside, lpips_inside."""
    out = []
    for ds, vals in values.items():
        for i, v in enumerate(vals):
            out.append({"dataset": ds, "clip": f"{ds}-{i}@0", "psnr": v, "lpips": 1 / v, "psnr_inside": v - 5,
                        "lpips_inside": 2 / v})
    return out


def test_pairing_removes_clip_difficulty():
    rng = np.random.default_rng(0)
    difficulty = rng.normal(30, 3, 40)  # clips differ by much more than the arms do
    a = difficulty + 0.2 + rng.normal(0, 0.05, 40)
    b = difficulty
    d = paired_difference(a[None], b[None])
    assert d.lo > 0 and d.excludes_zero and abs(d.mean - 0.2) < 0.05
    assert d.hi - d.lo < 0.1  # unpaired, the spread of either arm (3 dB) would swamp 0.2 dB
    same = paired_difference(b[None], b[None])
    assert same.mean == 0 and not same.excludes_zero


def test_seeds_widen_the_interval_when_they_disagree():
    rng = np.random.default_rng(1)
    base = rng.normal(30, 3, 30)
    agree = np.stack([base + 0.3 + rng.normal(0, 0.05, 30) for _ in range(3)])
    disagree = np.stack([base + s + rng.normal(0, 0.05, 30) for s in (-0.5, 0.3, 1.1)])
    narrow = paired_difference(agree, base[None])
    wide = paired_difference(disagree, base[None])
    assert wide.seeds == 3 and wide.hi - wide.lo > 3 * (narrow.hi - narrow.lo)


def test_undefined_values_drop_their_clip():
    a = np.array([[1.0, np.nan, 3.0]])
    b = np.array([[0.0, 0.0, 1.0]])
    d = paired_difference(a, b)
    assert d.clips == 2 and d.mean == 1.5


def test_the_table_pairs_clips_by_id_and_fits_120_columns():
    ref = rows({"synthetic": [30, 31, 32, 33], "real": [25, 26, 27]})
    other = [dict(r, psnr=r["psnr"] + 1) for r in ref][::-1]  # another order: pairing is by clip id
    fill = rows({"synthetic": [29, 30, 31, 32], "real": [26, 27, 28]})
    arms = {"with_left_conditioning": [ref], "without_left_conditioning": [other]}
    floors = {"warp_only": fill, "classical_fill": fill}
    m, clips = per_clip_matrix([other], "synthetic", "psnr")
    assert clips == sorted(clips) and m.shape == (1, 4)
    diffs = differences(arms, floors, reference="with_left_conditioning")
    d = next(x for x in diffs if x["label"] == "without_left_conditioning - with_left_conditioning"
             and x["dataset"] == "synthetic" and x["metric"] == "psnr")
    assert d["mean"] == 1.0 and d["lo"] == d["hi"] == 1.0 and d["excludes_zero"]
    vs_fill = [x for x in diffs if x["against"] == "classical_fill"]
    assert {x["arm"] for x in vs_fill} == set(arms)
    table = format_comparison(means(arms, floors), diffs, datasets_of(arms, floors))
    assert max(len(line) for line in table.splitlines()) <= 120, table
    assert "floor: classical_fill" in table and "synthetic (4 clips)" in table and "*" in table


def test_the_logged_tables_hold_the_printed_numbers():
    from lightning_m2s.comparison import difference_table, mean_table

    rng = np.random.default_rng(2)
    arms = {"a": [rows({"synthetic": list(rng.normal(30, 2, 6)), "real": list(rng.normal(25, 2, 5))})],
            "b": [rows({"synthetic": list(rng.normal(31, 2, 6)), "real": list(rng.normal(24, 2, 5))})]}
    floors = {"classical_fill": rows({"synthetic": list(rng.normal(29, 2, 6)), "real": list(rng.normal(26, 2, 5))})}
    mean_rows, diffs, datasets = means(arms, floors), differences(arms, floors, "a"), datasets_of(arms, floors)
    printed = format_comparison(mean_rows, diffs, datasets).splitlines()
    table = mean_table(mean_rows, datasets)
    for k, name in enumerate(table["arm"]):  # each row as printed: PSNR, LPIPS, PSNR-in, LPIPS-in per test set
        line = next(line for line in printed if line.startswith(name + " "))
        cells = [f"{table[f'{ds} {m}'][k]:.{3 if 'LPIPS' in m else 2}f}" for ds in datasets
                 for m in ("PSNR", "LPIPS", "PSNR-in", "LPIPS-in")]
        assert line[len(name):].split() == cells
    logged = difference_table(diffs)
    assert len(logged["printed"]) == len(diffs) and all(cell.strip() in "\n".join(printed) for cell in logged["printed"])
    assert logged["mean"][0] == round(diffs[0]["mean"], 2) and logged["excludes_zero"][0] == diffs[0]["excludes_zero"]
