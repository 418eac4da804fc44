"""What a researcher meets first. `m2s dashboard`: the first link it prints is the latest sweep's answer in
MLflow's model-training UI (its arms and floors side by side; a real sweep, a real MLflow server, a real
headless Chromium), and a dashboard stopped by Ctrl-C or SIGTERM is no error of make's. The CLI: every
command's help ends with an example, and a sweep's table ends with the checkpoint of each arm to use."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import unquote

import pytest
import yaml

from lightning_m2s import comparison, tracking
from lightning_m2s.dashboard import answer_links, free_port
from lightning_m2s.sweep import run_sweep

REPO = Path(__file__).resolve().parents[1]
# Two training-free arms: a grid with floors, a parent run, its table and figure in seconds.
GRID = {"study": "dash_grid", "experiment": "debug", "sampler": "grid",
        "arms": {"holes": {"module.variant": "warp_only"}, "fill": {"module.variant": "classical_fill"}},
        "seeds": [0], "objective": {"metric": "test/synthetic/psnr", "direction": "maximize"},
        "overrides": {"data.val_clips": 1, "trainer.enable_progress_bar": False}}


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """The grid run once: (tracking URI, store folder)."""
    root = tmp_path_factory.mktemp("dash")
    path = root / "dash_grid.yaml"
    path.write_text(yaml.safe_dump(GRID, sort_keys=False))  # the arms in their order: holes is the reference
    uri = f"sqlite:///{root / 'mlflow.db'}"
    summary = run_sweep(path, storage=f"sqlite:///{root / 'optuna.db'}", tracking_uri=uri, output_root=root)
    assert {t.state for t in summary.trials} == {"COMPLETE"}
    return uri, root


@pytest.fixture
def store(tmp_path) -> str:
    """A left_cond grid written by hand as a sweep logs it (before floors were runs of their own): a parent
    with the floors' metrics and the summary figure, a finished trial per arm and a failed one."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure
    from mlflow.entities import Metric

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = tracking.client(uri)
    exp = tracking.experiment_id(client, "sweep-left_cond")
    parent = client.create_run(exp, run_name="left_cond-x", tags={"m2s.study": "left_cond-x", "m2s.kind": "sweep",
                                                                  "m2s.ablation": "left_cond"}).info.run_id
    test = lambda base, prefix="": [Metric(f"{prefix}test/{d}/{m}", base + k, 0, 0)  # noqa: E731
                                    for d in ("synthetic", "real") for k, m in enumerate(("psnr", "lpips"))]
    for arm, status in (("with_left", "FAILED"), ("with_left", "FINISHED"), ("without_left", "FINISHED")):
        run = client.create_run(exp, run_name=f"{arm}-seed0", tags={"m2s.study": "left_cond-x", "m2s.kind": "trial",
                                "m2s.arm": arm, "m2s.seed": "0", "mlflow.parentRunId": parent}).info.run_id
        client.log_batch(run, metrics=test(21.0))
        client.set_terminated(run, status)
    client.log_batch(parent, metrics=test(20.0, "floor/warp_only/") + test(22.0, "floor/classical_fill/"))
    client.log_figure(parent, Figure(), "comparison/summary.png")
    client.set_terminated(parent)
    return uri


def test_the_first_link_of_a_store_puts_the_reference_arm_first_and_makes_floor_runs_once(store):
    links = answer_links(store, "http://127.0.0.1:1")
    assert answer_links(store, "http://127.0.0.1:1") == links  # found again, not made twice
    client, runs = _runs(store, "left_cond")
    name = {r.info.run_id: r.info.run_name for r in runs}
    ids = re.findall(r'"([0-9a-f]{32})"', unquote(links["compare"]))
    # the sweep file's reference arm first; the failed re-run is left out; then the floors
    assert [name[i] for i in ids] == ["without_left-seed0", "with_left-seed0", "floor: warp_only", "floor: classical_fill"]
    assert all(client.get_run(i).info.status == "FINISHED" for i in ids)
    floor = next(r for r in runs if r.info.run_name == "floor: classical_fill")
    assert floor.data.metrics == {"test/synthetic/psnr": 22.0, "test/synthetic/lpips": 23.0,
                                  "test/real/psnr": 22.0, "test/real/lpips": 23.0}
    palette = comparison.colors(["with_left", "without_left"])
    assert {name[i]: client.get_run(i).data.tags["mlflow.runColor"] for i in ids} == {
        "without_left-seed0": palette["without_left"], "with_left-seed0": palette["with_left"],
        "floor: warp_only": palette["warp_only"], "floor: classical_fill": palette["classical_fill"]}
    assert "workflowType=machine_learning" in links["compare"] and links["summary"].startswith(
        "http://127.0.0.1:1/#/experiments/")


def _runs(uri, ablation="dash_grid"):
    client = tracking.client(uri)
    exp = client.get_experiment_by_name(f"sweep-{ablation}")
    return client, client.search_runs([exp.experiment_id])


@pytest.mark.slow
def test_a_finished_sweep_has_its_floors_as_runs_and_one_colour_per_arm_and_floor(swept):
    uri, _ = swept
    client, runs = _runs(uri)
    (parent,) = [r for r in runs if r.data.tags.get("m2s.kind") == "sweep"]
    floors = {r.info.run_name: r for r in runs if r.data.tags.get("m2s.kind") == "floor"}
    assert set(floors) == {"floor: warp_only", "floor: classical_fill"}
    palette = comparison.colors(["holes", "fill"])
    for name, run in floors.items():
        variant = name.removeprefix("floor: ")
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id and run.info.status == "FINISHED"
        assert run.data.metrics["test/synthetic/psnr"] == parent.data.metrics[f"floor/{variant}/test/synthetic/psnr"]
        assert run.data.tags["mlflow.runColor"] == palette[variant]
        assert "m2s.ablation" not in run.data.tags  # that tag marks a grid's trained arms (queries by grid)
    trials = {r.data.tags["m2s.arm"]: r for r in runs if r.data.tags.get("m2s.kind") == "trial"}
    assert {a: r.data.tags["mlflow.runColor"] for a, r in trials.items()} == {a: palette[a] for a in trials}
    assert len({palette[a] for a in ["holes", "fill", "floor: warp_only", "floor: classical_fill"]}) == 4


def test_the_sweep_footer_names_each_arms_checkpoint_with_the_commands(tmp_path):
    from lightning_m2s.sweep import SweepResult, TrialResult, format_footer

    def result(trials):
        return SweepResult("left_cond-x", "test/synthetic/lpips", "minimize", "parent", trials, None, {}, {})

    trials = []
    for arm, seed, state in (("with_left", 1, "COMPLETE"), ("with_left", 0, "COMPLETE"), ("without_left", 0, "COMPLETE"),
                             ("broken", 0, "FAIL")):
        folder = tmp_path / f"{arm}-seed{seed}"
        (folder / "checkpoints").mkdir(parents=True)
        (folder / "checkpoints" / "best.ckpt").touch()
        trials.append(TrialResult(len(trials), arm, seed, state, None, {}, None, str(folder)))
    footer = format_footer(result(trials)).splitlines()
    assert footer[0].startswith("checkpoint of each arm (best.ckpt")
    best = tmp_path / "with_left-seed0" / "checkpoints" / "best.ckpt"  # the lowest seed's
    assert footer[1].split() == ["with_left", str(best)] and footer[2].split()[0] == "without_left"
    assert not any("broken" in line for line in footer)  # a failed trial's checkpoint is not offered
    assert footer[-2].strip() == f"m2s evaluate {best} --sources real"
    assert footer[-1].strip().startswith(f"m2s convert VIDEO.mp4 --checkpoint {best} --depth")
    assert format_footer(result([TrialResult(0, "holes", 0, "COMPLETE", None, {}, None, None)])) == ""


def test_every_command_help_ends_with_an_example():
    from lightning_m2s.cli import SWEEP_INFO, build_parser
    from lightning_m2s.config import SWEEPS_DIR

    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    for name, sub in commands.items():
        text = sub.format_help()
        assert "\nexample:\n" in text and f"m2s {name}" in text.split("example:")[-1], name
    top = parser.format_help()
    assert "decoder" in top and "example:" in top
    sweep_help = commands["sweep"].format_help()
    for grid in sorted(p.stem for p in SWEEPS_DIR.glob("*.yaml")):  # every grid, what it reproduces, its time
        assert grid in SWEEP_INFO and f"  {grid} " in sweep_help, grid
        assert f"(about {SWEEP_INFO[grid][2]} min)" in sweep_help


@pytest.mark.slow
def test_the_first_link_compares_arms_and_floors_in_the_model_training_ui(swept):
    uri, _ = swept
    links = answer_links(uri, "http://127.0.0.1:1")
    links_again = answer_links(uri, "http://127.0.0.1:1")  # found again: no second set of floor runs
    assert links == links_again
    client, runs = _runs(uri)
    assert sum(r.data.tags.get("m2s.kind") == "floor" for r in runs) == 2
    name = {r.info.run_id: r.info.run_name for r in runs}
    ids = re.findall(r'"([0-9a-f]{32})"', unquote(links["compare"]))
    assert [name[i] for i in ids] == ["holes-seed0", "fill-seed0", "floor: warp_only", "floor: classical_fill"]
    assert links["compare"].endswith("workflowType=machine_learning")  # the UI's mode switch, not the GenAI pages
    assert links["summary"].endswith("/artifacts/comparison/summary.png?workflowType=machine_learning")
    assert links["status"] == "FINISHED"


def _dom(url: str, tmp: Path) -> str:
    out = subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                          "--disable-background-networking", "--disable-component-update", "--disable-sync",
                          f"--user-data-dir={tmp / 'profile'}", "--window-size=1800,1400",
                          "--virtual-time-budget=20000", "--dump-dom", url],
                         capture_output=True, text=True, timeout=180)
    return re.sub(r"<[^>]+>", " ", out.stdout)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Debian's chromium (apt-get install chromium)")
def test_the_first_printed_link_shows_arms_floors_and_psnr_in_a_browser(swept, tmp_path):
    uri, _ = swept
    port = free_port()
    log = tmp_path / "dash.log"
    proc = subprocess.Popen([sys.executable, "-m", "lightning_m2s.cli", "dashboard", "--tracking-uri", uri, "--port",
                             str(port)], stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while "MLflow dashboard:" not in log.read_text() and time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()
            time.sleep(0.5)
        first = re.search(r"http://\S+", log.read_text()).group(0)
        assert "compare-runs" in first
        text = _dom(first, tmp_path)
        for word in ("holes-seed0", "fill-seed0", "floor: warp_only", "floor: classical_fill", "test/synthetic/psnr",
                     "test/real/lpips_inside"):
            assert word in text, word
        assert re.search(r"\b\d{2}\.\d{1,3}\b", text)  # PSNR values
        assert not [w for w in ("Traces", "Token Usage", "Detect Issues") if w in text]  # no GenAI page
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
    assert proc.wait(60) == 143


def _m2s_child(session: int) -> int:
    """The m2s dashboard process of a `make dashboard` session."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            if os.getsid(int(pid)) == session and any(c.endswith(b"m2s") for c in cmd) and b"dashboard" in cmd:
                return int(pid)
        except (OSError, ProcessLookupError):
            continue
    raise AssertionError("no m2s dashboard process in the make session")


@pytest.mark.slow
@pytest.mark.parametrize("how", ["SIGTERM to the dashboard", "Ctrl-C"])
def test_make_dashboard_stopped_is_no_error(tmp_path, how):
    port = free_port()
    make = subprocess.Popen(["make", "-s", "-C", str(REPO), "dashboard", f"ARGS=--port {port}"],
                            env={**os.environ, "M2S_ROOT": str(tmp_path)}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    out = []
    while not any("MLflow dashboard:" in line for line in out):
        line = make.stdout.readline()
        assert line, "".join(out)
        out.append(line)
    if how == "Ctrl-C":  # the terminal sends SIGINT to make and the dashboard alike
        os.killpg(make.pid, signal.SIGINT)
    else:
        os.kill(_m2s_child(make.pid), signal.SIGTERM)
    out.append(make.stdout.read())
    code = make.wait(60)
    text = "".join(out)
    assert "Error" not in text and "***" not in text, text
    assert code == (0 if how != "Ctrl-C" else -signal.SIGINT)
