"""m2s evaluate: a checkpoint scored on chosen test sources, with floors and per-clip rows, as its own MLflow run."""

from __future__ import annotations

import json

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from lightning_m2s.cli import main as cli_main
from conftest import write_folder_clip


def test_evaluate_scores_a_checkpoint_on_the_users_videos_and_logs_a_run(tmp_path, debug_checkpoint, stereo_arrays, capsys):
    left, right, disparity = stereo_arrays
    write_folder_clip(tmp_path / "mine", "clip0", left, right, disparity, fps=5.0)
    uri = f"sqlite:///{tmp_path / 'eval.db'}"
    cli_main(["evaluate", str(debug_checkpoint), f"tracking.uri={uri}", "data.test_clips=3", "--experiment", "debug",
              "--sources", f"synthetic,folder={tmp_path / 'mine'}"])
    printed = capsys.readouterr().out
    assert "floor: classical_fill" in printed and "folder/psnr" in printed

    client = MlflowClient(uri)
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    run = runs[0]
    assert run.data.tags["m2s.kind"] == "evaluate" and run.data.tags["m2s.checkpoint"] == str(debug_checkpoint)
    m = run.data.metrics
    for key in ("test/synthetic/psnr", "test/synthetic/lpips", "test/folder/psnr",
                "floor/warp_only/test/folder/psnr", "floor/classical_fill/test/synthetic/lpips"):
        assert np.isfinite(m[key]), key
    assert run.data.params["data.eval_size"] == "32"  # the experiment's evaluation settings, logged once
    # per-clip rows: every clip (3, interleaved over the sources), for the model and each floor; their mean is the metric
    local = client.download_artifacts(run.info.run_id, "metrics/test_per_clip.json", str(tmp_path))
    rows = json.loads(open(local).read())
    folder_rows = [r for r in rows["rows"] if r["dataset"] == "folder"]
    assert len(folder_rows) == 1 and len([r for r in rows["rows"] if r["dataset"] == "synthetic"]) == 2
    assert folder_rows[0]["psnr"] == pytest.approx(m["test/folder/psnr"], rel=1e-4)
    assert set(rows["floors"]) == {"warp_only", "classical_fill"}


def test_evaluate_names_a_bad_source_and_a_bad_checkpoint(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["evaluate", str(tmp_path / "x.ckpt"), "--sources", "kitti"])
    assert exit_info.value.code == 2 and "--sources 'kitti'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main(["evaluate", str(tmp_path / "missing.ckpt"), f"tracking.uri=sqlite:///{tmp_path / 'e.db'}"])
    assert "missing.ckpt does not exist" in capsys.readouterr().err
