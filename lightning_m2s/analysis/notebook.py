"""The report notebook: what its cells display per grid, and running it headless into HTML."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pandas as pd

from lightning_m2s import tracking
from lightning_m2s.analysis.answers import not_run_line
from lightning_m2s.analysis.plots import plot_ablation, plot_differences, plot_qualitative
from lightning_m2s.analysis.runs import has_runs
from lightning_m2s.analysis.tables import TABLE_STYLE, differences_table
from lightning_m2s.config import PROJECT_ROOT
from lightning_m2s.errors import M2SError

NOTEBOOK = PROJECT_ROOT / "notebooks" / "tables_4_10.ipynb"


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
