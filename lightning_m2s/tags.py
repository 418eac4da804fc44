"""The MLflow tags the project writes and reads, named once: a query and the run it looks for agree.

Every run carries KIND; a sweep's runs carry STUDY (its Optuna study) and ABLATION (its sweep file),
a trial's run also ARM and SEED. `filter_tag(KIND, SWEEP)` is the search_runs filter for one value.
"""

KIND = "m2s.kind"  # what the run is: one of the kinds below
TRAIN, TRIAL, SWEEP, FLOOR, EVALUATE = "train", "trial", "sweep", "floor", "evaluate"

STUDY = "m2s.study"  # the Optuna study of a sweep (its parent, trials and floors)
ABLATION = "m2s.ablation"  # the sweep file's name, e.g. left_cond
EXPERIMENT = "m2s.experiment"  # the experiment file the run's config starts from
ARM = "m2s.arm"  # a trial's arm (a grid) or trial<k> (a search)
ARMS = "m2s.arms"  # on a sweep's parent run: its arms in the sweep file's order (JSON list)
SEED = "m2s.seed"
TRIAL_KEY = "m2s.trial_key"  # <arm>-seed<k>: a retried trial finds its run by it
TRIAL_NUMBER = "m2s.trial"  # the Optuna trial number
FLOOR_VARIANT = "m2s.floor"  # warp_only | classical_fill
OBJECTIVE = "m2s.objective"  # on a sweep's parent run: the metric its trials return
ERROR = "m2s.error"  # the traceback of a failed trial
GIT_COMMIT = "m2s.git_commit"
VARIANT = "m2s.variant"  # module.variant
CHECKPOINT = "m2s.checkpoint"  # best.ckpt of a training run; the evaluated file of an evaluate run
INIT_FROM = "m2s.init_from"
INTERRUPTED = "m2s.interrupted"  # the signal that stopped a run
WORKER, CUDA_VISIBLE_DEVICES, TORCH_THREADS = "m2s.worker", "m2s.cuda_visible_devices", "m2s.torch_threads"
METRICS_PREFIX = "m2s.metrics."  # evaluation settings the numbers depend on: m2s.metrics.lpips_net, ...

PARENT_RUN = "mlflow.parentRunId"
NOTE = "mlflow.note.content"
RUN_COLOR = "mlflow.runColor"


def filter_tag(tag: str, value: str) -> str:
    """An MLflow search_runs filter on one tag value (tags with dots need backquotes)."""
    return f"tags.`{tag}` = '{value}'"
