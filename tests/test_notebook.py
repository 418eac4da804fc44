"""The notebook runs headless (papermill, as `make notebook` does) against a filled store and writes its HTML."""

from __future__ import annotations

import nbformat
import pytest

from lightning_m2s import analysis
from lightning_m2s.errors import ConfigError, M2SError
from test_analysis import fill_store  # the same hand-filled store as the analysis tests


def test_notebook_has_parameters_cell_and_every_table():
    nb = nbformat.read(analysis.NOTEBOOK, as_version=4)
    params = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1 and "tracking_uri = None" in params[0].source
    headings = [c.source.splitlines()[0] for c in nb.cells if c.cell_type == "markdown"]
    for n in analysis.TABLES:
        assert any(h.startswith(f"## Table {n}:") for h in headings), n
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), "commit the notebook without outputs"


@pytest.mark.slow
def test_notebook_executes_and_writes_html(tmp_path):
    uri = fill_store(tmp_path / "store")
    html = analysis.run_notebook(uri, tmp_path / "report" / "tables_4_10.html")
    text = html.read_text(encoding="utf-8")
    for n in analysis.TABLES:
        assert f"Table {n}" in text
    assert "22.50 ± 0.71" in text  # Table 4, with_left: mean and std over two seeds from the store
    assert "no finished run yet for loss/C_latent" in text  # missing runs are named
    assert "26.2" in text and "paper" in text
    assert text.count("data:image/png;base64") >= 10  # the plots are embedded
    assert "Traceback" not in text
    # a report: the answers before the first table, a grid without runs is one line saying how to run it,
    # nothing printed to stderr (download bars, warnings), no code
    assert text.index("The answers") < text.index("Table 4:")
    assert "mean PSNR (dB) on synthetic: with_left 22.50 dB, without_left 21.00 dB" in text  # no logged differences
    assert "has no finished runs: <code>make sweep ABLATION=left_cond_diffusion</code>" in text
    assert 'data-mime-type="application/vnd.jupyter.stderr"' not in text and "Downloading artifacts" not in text
    assert "analysis.show_grid" not in text
    # The committed notebook stays as it was: papermill wrote the executed copy elsewhere.
    assert all(not c.get("outputs") for c in nbformat.read(analysis.NOTEBOOK, as_version=4).cells
               if c.cell_type == "code")


def test_run_notebook_errors_name_the_problem(tmp_path):
    with pytest.raises(ConfigError, match="not a URI"):
        analysis.run_notebook("mlflow.db", tmp_path / "r.html")  # a path, not a URI: caught before any kernel
    broken = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell("tracking_uri = None", metadata={"tags": ["parameters"]}),
        nbformat.v4.new_code_cell("raise ValueError('no such table')")])
    broken.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    path = tmp_path / "broken.ipynb"
    nbformat.write(broken, path)
    with pytest.raises(M2SError, match="broken.ipynb: cell .*ValueError: no such table"):
        analysis.run_notebook(f"sqlite:///{tmp_path / 'x.db'}", tmp_path / "r.html", notebook=path)
    assert not (tmp_path / "r.html").exists()


def test_notebook_on_a_store_filled_by_real_tiny_sweeps(tmp_path):
    # The real pipeline end to end: sweeps train and evaluate (debug scale), the notebook reads their runs.
    from lightning_m2s.sweep import run_sweep

    uri, storage = f"sqlite:///{tmp_path / 'mlflow.db'}", f"sqlite:///{tmp_path / 'optuna.db'}"
    fast = ["data.val_clips=1", "trainer.enable_progress_bar=false", "module.eval.preview_clips=1"]
    for ablation in ("left_cond", "baselines"):
        summary = run_sweep(ablation, experiment="debug", overrides=fast, storage=storage, tracking_uri=uri,
                            output_root=tmp_path)
        assert {t.state for t in summary.trials} == {"COMPLETE"}
    runs = analysis.load_runs(uri)
    table4 = analysis.build_table(runs, "4").values
    ours = table4[[c for c in table4.columns if c[0].startswith("ours")]]
    filled = ours.notna().any(axis=1)
    floors = filled.index.get_level_values("row").str.startswith(analysis.FLOOR_PREFIX)
    assert filled[~floors].sum() == 2  # the with / without V_l rows are filled, nothing else invented
    assert filled[floors].sum() == 2  # and the grid's two floors, logged by its sweep
    table6 = analysis.build_table(runs, "6").values
    filled6 = table6[[c for c in table6.columns if c[0].startswith("ours")]].notna().any(axis=1)
    assert filled6.sum() == 3 + 2
    text = analysis.run_notebook(uri, tmp_path / "tables_4_10.html").read_text(encoding="utf-8")
    assert "Traceback" not in text and "Table 10" in text
    assert "with_left − without_left" in text  # the grid's paired differences, treatment − reference
    assert "<strong>left_cond</strong> (debug, 1 seed; PSNR (dB), treatment − reference" in text  # its answer in words
