"""Sweeps: every grid file is valid; a real (fast) grid runs, resumes, records failures and skips finished
trials; the MLflow dashboard serves the runs and stops cleanly. (Several workers on one study: test_postgres.)"""

import json
import os
import urllib.request

import mlflow
import pytest
import yaml

from lightning_m2s.config import SWEEPS_DIR, load_config
from lightning_m2s.data import datamodule
from lightning_m2s.dashboard import free_port, start_server, stop_server, wait_ready
from lightning_m2s.errors import ConfigError
from lightning_m2s.sweep import load_sweep, name_of_study, run_sweep

SWEEPS = sorted(p.stem for p in SWEEPS_DIR.glob("*.yaml"))
# Baseline arms train nothing, so a grid over them exercises Optuna + MLflow + evaluation in seconds.
FAST_GRID = {
    "study": "fast_grid", "experiment": "debug", "sampler": "grid",
    "arms": {"warp_only": {"module.variant": "warp_only"}, "classical_fill": {"module.variant": "classical_fill"},
             "broken": {"module.variant": "warp_only", "data.eval_size": 12}},  # 12 is no multiple of 8: fails
    "seeds": [0], "objective": {"metric": "test/synthetic/psnr", "direction": "maximize"},
    "overrides": {"data.val_clips": 1, "trainer.enable_progress_bar": False},
}


@pytest.mark.parametrize("name", SWEEPS)
def test_sweep_file_is_valid_and_every_arm_is_a_valid_config(name):
    spec = load_sweep(name)
    overrides = [f"{k}={v}" for k, v in spec.overrides.items()]
    if spec.sampler == "grid":
        assert spec.grid_size >= 2
        for arm, arm_overrides in spec.arms.items():
            load_config(spec.experiment, overrides + [f"{k}={v}" for k, v in arm_overrides.items()])
    else:
        assert spec.search_space and spec.trials


def test_other_settings_or_other_shipped_weights_are_another_study(tmp_path, monkeypatch):
    """A grid over the embedded weights never reuses trials of weights re-made since (`make weights`)."""
    import shutil

    from lightning_m2s.models import embedded

    spec = load_sweep("left_cond")
    cfg = load_config(spec.experiment)
    shipped = name_of_study(spec, spec.experiment, [], cfg)
    assert shipped == name_of_study(spec, spec.experiment, [], cfg)  # the same grid finds its study again
    assert name_of_study(spec, spec.experiment, ["optim.lr=1e-3"], cfg) != shipped
    remade = tmp_path / "weights"
    shutil.copytree(embedded.weights_root(), remade)
    manifest = json.loads((remade / "manifest.json").read_text())
    manifest["metrics"]["prior"]["steps"] += 1  # a re-run of the recipes
    (remade / "manifest.json").write_text(json.dumps(manifest))
    monkeypatch.setenv(embedded.WEIGHTS_ENV, str(remade))
    assert name_of_study(spec, spec.experiment, [], cfg) != shipped
    monkeypatch.delenv(embedded.WEIGHTS_ENV)
    # an edited experiment file (the same overrides) and other default training data: other studies
    assert name_of_study(spec, spec.experiment, [], load_config(spec.experiment, ["optim.lr=1e-3"])) != shipped
    monkeypatch.setattr(datamodule, "DEFAULT_TRAIN", datamodule.DEFAULT_TRAIN[:1])
    assert name_of_study(spec, spec.experiment, [], cfg) != shipped
    debug = load_config("debug")  # a random tiny model: the weights are not part of it
    assert name_of_study(spec, "debug", [], debug).startswith("left_cond-debug-")


def _arm_configs(name):
    spec = load_sweep(name)
    return {arm: load_config(spec.experiment, [f"{k}={v}" for k, v in {**spec.overrides, **over}.items()])
            for arm, over in spec.arms.items()}


def test_the_paper_ablations_have_their_grids():
    assert {"left_cond", "left_cond_diffusion", "full_attention", "loss", "inference_steps", "runtime",
            "baselines"} <= set(SWEEPS)
    assert set(load_sweep("loss").arms) == {"A_B_standard", "C_latent", "D_end_to_end"}


def test_paper_rows_train_once_per_regime_without_full_attention():
    """Tables 5 and 10 test one trained model at several step counts; their rows (Table 5 D = Table 4's
    "+ V_l, 1 step") are without full attention; the 25-step rows of Tables 4 / 7 have their own grid."""
    loss = _arm_configs("loss")
    assert list(loss["A_B_standard"].module.eval.steps) == [25, 1]  # rows A and B: one model
    steps = _arm_configs("inference_steps")
    assert {arm: (c.module.variant, list(c.module.eval.steps)) for arm, c in steps.items()} == {
        "standard": ("standard_diffusion", [1, 5, 25]), "end_to_end": ("end_to_end", [1, 5, 25])}
    for arms in (loss, steps):
        assert not any(c.model.full_attention for c in arms.values())
        assert len({c.module.variant for c in arms.values()}) == len(arms)  # one training per regime
    rows = {(c.module.variant, c.model.left_condition, 25 in list(c.module.eval.steps))
            for c in _arm_configs("left_cond_diffusion").values()}
    assert rows == {("standard_diffusion", True, True), ("standard_diffusion", False, True)}
    assert load_sweep("left_cond").overrides == {"model.full_attention": False}  # the default grid: unchanged


def test_bad_sweep_files_name_file_and_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**FAST_GRID, "objectiv": {}}))
    with pytest.raises(ConfigError, match=r"bad\.yaml.*objectiv"):
        load_sweep(bad)
    bad.write_text(yaml.safe_dump({**FAST_GRID, "objective": {"metric": "x", "direction": "up"}}))
    with pytest.raises(ConfigError, match="direction"):
        load_sweep(bad)
    with pytest.raises(ConfigError, match="no sweep named"):
        load_sweep("left_cnd")


@pytest.fixture(scope="module")
def fast_sweep(tmp_path_factory):
    """The fast grid run once: (sweep file, storage URL, tracking URI, output root, summary)."""
    root = tmp_path_factory.mktemp("sweep")
    path = root / "fast_grid.yaml"
    path.write_text(yaml.safe_dump(FAST_GRID))
    storage, uri = f"sqlite:///{root / 'optuna.db'}", f"sqlite:///{root / 'mlflow.db'}"
    summary = run_sweep(path, storage=storage, tracking_uri=uri, output_root=root)
    return path, storage, uri, root, summary


def test_grid_runs_every_arm_and_records_the_failing_one(fast_sweep):
    _, _, uri, _, summary = fast_sweep
    states = {t.arm: t.state for t in summary.trials}
    assert states == {"warp_only": "COMPLETE", "classical_fill": "COMPLETE", "broken": "FAIL"}
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name("sweep-fast_grid")
    runs = client.search_runs([exp.experiment_id])
    parent = [r for r in runs if r.data.tags.get("m2s.kind") == "sweep"]
    children = [r for r in runs if r.data.tags.get("m2s.kind") == "trial"]
    assert len(parent) == 1 and len(children) == 3
    for run in children:
        assert run.data.tags["mlflow.parentRunId"] == parent[0].info.run_id
        assert {"m2s.ablation", "m2s.arm", "m2s.git_commit", "m2s.study", "m2s.trial"} <= set(run.data.tags)
    status = {r.data.tags["m2s.arm"]: r.info.status for r in children}
    assert status["broken"] == "FAILED" and status["warp_only"] == "FINISHED"
    finished = [r for r in children if r.info.status == "FINISHED"]
    assert all("test/synthetic/psnr" in r.data.metrics and "data.eval_size" in r.data.params for r in finished)
    assert not [k for r in finished for k in r.data.params if "/" in k]  # the config once, no `model/...` copies
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"  # the UI opens on the runs table


def test_rerunning_a_sweep_retries_only_what_failed(fast_sweep):
    path, storage, uri, root, _ = fast_sweep
    summary = run_sweep(path, storage=storage, tracking_uri=uri, output_root=root)
    arms = [t.arm for t in summary.trials]
    assert arms.count("warp_only") == 1 and arms.count("classical_fill") == 1  # finished: not redone
    assert arms.count("broken") == 2  # the failed arm was tried once more (and fails again)


def test_dashboard_serves_the_sweep_runs_and_stops_cleanly(fast_sweep):
    _, _, uri, _, _ = fast_sweep
    port = free_port()
    proc = start_server(uri, port=port)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(proc, url)
        request = urllib.request.Request(f"{url}/api/2.0/mlflow/experiments/get-by-name?experiment_name=sweep-fast_grid")
        exp = json.load(urllib.request.urlopen(request, timeout=10))["experiment"]
        body = json.dumps({"experiment_ids": [exp["experiment_id"]], "max_results": 50}).encode()
        search = urllib.request.Request(f"{url}/api/2.0/mlflow/runs/search", data=body,
                                        headers={"Content-Type": "application/json"})
        runs = json.load(urllib.request.urlopen(search, timeout=10))["runs"]
        arms = {t["value"] for r in runs for t in r["data"]["tags"] if t["key"] == "m2s.arm"}
        assert {"warp_only", "classical_fill", "broken"} <= arms
    finally:
        stop_server(proc)
    with pytest.raises(ProcessLookupError):
        os.killpg(proc.pid, 0)  # no process of the server's group is left


def test_racing_workers_settle_on_one_run_when_an_older_run_lands_late(tmp_path, monkeypatch):
    from lightning_m2s import tracking

    client = tracking.client(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = tracking.experiment_id(client, "sweep-race")
    tags = {"m2s.study": "race", "m2s.kind": "sweep"}
    racer = {}

    def another_worker_lands(_seconds):  # its create_run started first (older start time), lands during the wait
        racer["run"] = client.create_run(exp, start_time=1, tags=tags)

    monkeypatch.setattr(tracking.time, "sleep", another_worker_lands)
    run = tracking.find_or_create_run(client, exp, tags, "race", {}, settle_s=tracking.RACE_SETTLE_S)
    assert run.info.run_id == racer["run"].info.run_id  # the older racer's run is the one kept
    assert [r.info.run_id for r in client.search_runs([exp])] == [run.info.run_id]  # ours was deleted
