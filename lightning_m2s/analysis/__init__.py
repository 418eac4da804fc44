"""Tables 4-10 of the paper from the sweeps' MLflow runs, beside the paper's published numbers.

The notebook `notebooks/tables_4_10.ipynb` only calls this package. Data flow:

    load_runs(uri) -> tidy frame (one row per finished trial run x metric)          runs.py
    build_table(runs, "4") -> TableResult (ours: mean and std over seeds; paper)     tables.py
    plot_* (runs, ...) -> matplotlib Figures                                         plots.py
    answers(runs, diffs) -> each grid's answer in words                              answers.py
    run_notebook(uri) -> the notebook executed headless, as HTML                     notebook.py

The sweeps and their arms come from sweeps/*.yaml (grids.py). What the sweeps log (one MLflow experiment
`sweep-<ablation>`, one child run per trial tagged with KIND trial, ARM, SEED and the metric settings
m2s.metrics.*, see lightning_m2s.tags): final metrics `test/<dataset>/<metric>[_inside|_outside]`,
`test/latency_s`, `test/steps`, and for a model tested at several step counts also
`test/<dataset>/steps<N>/<metric>` and `test/steps<N>/latency_s` for each N (the plain names then repeat the
first count), and the artifact `qualitative/<dataset>_clip0.npz`. A table cell with no finished run is NaN
(shown as "—"); nothing is filled in.
"""

from lightning_m2s.analysis.answers import answer, answers
from lightning_m2s.analysis.notebook import NOTEBOOK, run_notebook, show_grid
from lightning_m2s.analysis.plots import (plot_ablation, plot_differences, plot_inference_steps, plot_latency,
                                          plot_qualitative)
from lightning_m2s.analysis.runs import (FLOOR_PREFIX, TIDY_COLUMNS, load_differences, load_floors, load_qualitative,
                                         load_runs, parse_metric, run_overview, status_counts, treatment_first)
from lightning_m2s.analysis.tables import (OTHER_SETTINGS, TABLES, TableResult, build_table, build_tables,
                                           differences_table, run_table)

__all__ = ["FLOOR_PREFIX", "NOTEBOOK", "OTHER_SETTINGS", "TABLES", "TIDY_COLUMNS", "TableResult", "answer", "answers",
           "build_table", "build_tables", "differences_table", "load_differences", "load_floors", "load_qualitative",
           "load_runs", "parse_metric", "plot_ablation", "plot_differences", "plot_inference_steps", "plot_latency",
           "plot_qualitative", "run_notebook", "run_overview", "run_table", "show_grid", "status_counts",
           "treatment_first"]
