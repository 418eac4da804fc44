"""A sweep file (sweeps/<name>.yaml): parsed, checked against the experiment, and named as a study.

A sweep file names its study, the experiment it starts from, and either `arms` (named sets of config
overrides, run as a grid over arm x seed: the paper's ablation tables) or a `search_space` (sampled by TPE
or random: hyperparameter search). Everything here runs before any trial, so a typo is an error at once.
"""

from __future__ import annotations

import difflib
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from lightning_m2s import tracking
from lightning_m2s.config import SWEEPS_DIR, check_name, load_config, resolve_file, to_container
from lightning_m2s.errors import ConfigError
from lightning_m2s.models import embedded

SWEEP_KEYS = {"study", "description", "experiment", "sampler", "arms", "seeds", "search_space", "trials",
              "objective", "overrides", "table", "heartbeat", "slurm"}
SAMPLERS = ("grid", "tpe", "random")
HEARTBEAT_KEYS = {"interval", "grace"}  # seconds between a worker's heartbeats; silence before its trial is retried
SLURM_KEYS = {"partition", "workers", "devices_per_trial", "time_min", "additional"}  # --launcher slurm defaults


@dataclass
class SweepSpec:
    """A parsed sweeps/<name>.yaml."""

    name: str
    study: str
    experiment: str
    objective_metric: str
    direction: str
    sampler: str = "grid"
    arms: dict[str, dict[str, Any]] = field(default_factory=dict)
    seeds: list[int] = field(default_factory=lambda: [0])
    search_space: dict[str, dict[str, Any]] = field(default_factory=dict)
    trials: int | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    table: str = ""
    heartbeat: dict[str, int] = field(default_factory=lambda: {"interval": 30, "grace": 120})
    slurm: dict[str, Any] = field(default_factory=dict)

    @property
    def is_grid(self) -> bool:
        return self.sampler == "grid"

    @property
    def grid(self) -> dict[str, list]:
        return {"arm": list(self.arms), "seed": list(self.seeds)}

    @property
    def grid_size(self) -> int:
        return len(self.arms) * len(self.seeds)


def load_sweep(name: str | Path) -> SweepSpec:
    path = resolve_file(name, SWEEPS_DIR, "sweep")
    raw = _read_mapping(path)
    unknown = set(raw) - SWEEP_KEYS
    if unknown:
        raise ConfigError(f"{path}: unknown keys {sorted(unknown)}; allowed: {sorted(SWEEP_KEYS)}")
    for key in ("study", "objective"):
        if key not in raw:
            raise ConfigError(f"{path}: missing key {key!r}")
    objective = raw["objective"]
    if not isinstance(objective, dict) or set(objective) != {"metric", "direction"}:
        raise ConfigError(f"{path}: objective must be {{metric: ..., direction: minimize|maximize}}")
    if objective["direction"] not in ("minimize", "maximize"):
        raise ConfigError(f"{path}: objective.direction must be minimize or maximize, got {objective['direction']!r}")
    sampler = raw.get("sampler", "grid")
    if sampler not in SAMPLERS:
        raise ConfigError(f"{path}: sampler must be grid, tpe or random, got {sampler!r}")
    if sampler == "grid" and not raw.get("arms"):
        raise ConfigError(f"{path}: a grid sweep needs `arms` (name -> config overrides)")
    if sampler != "grid" and not raw.get("search_space"):
        raise ConfigError(f"{path}: a {sampler} sweep needs `search_space`")
    check_name(str(raw["study"]), f"{path}: study")
    for arm in raw.get("arms") or {}:
        check_name(str(arm), f"{path}: arm")
    heartbeat = {"interval": 30, "grace": 120, **_section(raw, "heartbeat", HEARTBEAT_KEYS, path)}
    if not all(isinstance(v, int) for v in heartbeat.values()) or not 0 < heartbeat["interval"] < heartbeat["grace"]:
        raise ConfigError(f"{path}: heartbeat needs whole seconds 0 < interval < grace, got {heartbeat}")
    return SweepSpec(
        name=path.stem,
        study=raw["study"],
        experiment=raw.get("experiment", "tiny"),
        objective_metric=objective["metric"],
        direction=objective["direction"],
        sampler=sampler,
        arms={k: dict(v or {}) for k, v in (raw.get("arms") or {}).items()},
        seeds=list(raw.get("seeds", [0])),
        search_space=raw.get("search_space") or {},
        trials=raw.get("trials"),
        overrides=raw.get("overrides") or {},
        description=raw.get("description", ""),
        table=raw.get("table", ""),
        heartbeat=heartbeat,
        slurm=_section(raw, "slurm", SLURM_KEYS, path),
    )


def _read_mapping(path: Path) -> dict:
    try:
        raw = to_container(OmegaConf.load(path))
    except Exception as err:  # noqa: BLE001 - YAML syntax (the parser names line and column), unreadable file
        raise ConfigError(f"{path}: cannot read YAML: {' '.join(str(err).split())}") from err
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a sweep file must be a mapping of keys, got {type(raw).__name__}")
    return raw


def _section(raw: dict, key: str, allowed: set[str], path: Path) -> dict:
    section = raw.get(key) or {}
    if not isinstance(section, dict) or set(section) - allowed:
        raise ConfigError(f"{path}: {key} takes the keys {sorted(allowed)}, got {section!r}")
    return section


def dotlist(overrides: dict[str, Any]) -> list[str]:
    """Config overrides as the key=value strings load_config reads."""
    return [f"{k}={yaml_value(v)}" for k, v in overrides.items()]


def yaml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (list, dict)):
        return json.dumps(value)  # JSON is YAML flow syntax, which the dotlist parser reads
    return str(value)


def sweep_overrides(spec: SweepSpec, overrides: list[str] | None) -> list[str]:
    """The sweep file's `overrides`, then the command line's (which win)."""
    return dotlist(spec.overrides) + list(overrides or [])


def search_space_bounds(spec: SweepSpec) -> list[dict[str, Any]]:
    """The corners a search space can reach: every key at its low, then at its high (or first / last choice)."""
    low, high = {}, {}
    for key, dist in spec.search_space.items():
        kind = dist.get("type", "float") if isinstance(dist, dict) else None
        if kind in ("float", "int") and {"low", "high"} <= set(dist):
            low[key], high[key] = dist["low"], dist["high"]
        elif kind == "categorical" and dist.get("choices"):
            low[key], high[key] = dist["choices"][0], dist["choices"][-1]
        else:
            raise ConfigError(f"sweep {spec.name}: search_space.{key} must be {{type: float|int, low, high}} or "
                              f"{{type: categorical, choices: [...]}}, got {dist!r}")
    return [low, high]


def check_sweep(spec: SweepSpec, experiment: str, user_overrides: list[str]):
    """Resolve every arm's config (a search space's at its bounds) and check that each logs the objective
    metric, so a typo is an error before any trial trains. Returns the config without arm overrides."""
    from lightning_m2s.evaluation import logged_metrics

    cfg = load_config(experiment, user_overrides)
    if spec.is_grid:
        if not all(isinstance(s, int) and not isinstance(s, bool) for s in spec.seeds):
            raise ConfigError(f"sweep {spec.name}: seeds must be whole numbers, got {spec.seeds}")
        points = {f"arm {arm!r}": dotlist(overrides) for arm, overrides in spec.arms.items()}
    else:
        points = {f"search_space bound {i}": dotlist(p) for i, p in enumerate(search_space_bounds(spec))}
    for where, overrides in points.items():
        try:
            logged = logged_metrics(load_config(experiment, user_overrides + overrides))
        except ConfigError as err:
            raise ConfigError(f"sweep {spec.name}, {where}: {err}") from err
        if spec.objective_metric not in logged:
            close = difflib.get_close_matches(spec.objective_metric, sorted(logged), n=3)
            hint = f"; did you mean {' or '.join(close)}?" if close else f"; it logs {sorted(logged)}"
            raise ConfigError(f"sweep {spec.name}: objective.metric {spec.objective_metric!r} is not logged by "
                              f"experiment {experiment} ({where}){hint}")
    return cfg


def check_sweep_file(name: str | Path, experiment: str | None = None, overrides: list[str] | None = None,
                     tracking_uri: str | None = None) -> None:
    """What run_sweep checks before any trial, for a launcher to check before it starts workers or jobs."""
    spec = load_sweep(name)
    tracking.check_server(tracking.resolve_uri(tracking_uri))
    check_sweep(spec, experiment or spec.experiment, sweep_overrides(spec, overrides))


def name_of_study(spec: SweepSpec, experiment: str, overrides: list[str] | None, cfg) -> str:
    """The Optuna study of a grid: other settings (overrides, an edited experiment file, other default
    data), or other shipped weights (re-made by `make weights`), are another study, so their trials never
    mix and their checkpoints never resume."""
    from lightning_m2s.data import datamodule

    name = spec.study if experiment == spec.experiment else f"{spec.study}-{experiment}"
    identity = sorted(overrides or []) + [
        OmegaConf.to_yaml(cfg, resolve=True),
        json.dumps([datamodule.DEFAULT_TRAIN, datamodule.DEFAULT_VAL, datamodule.DEFAULT_TEST], sort_keys=True),
    ]
    if cfg.model.pretrained == embedded.EMBEDDED_NAME:
        identity.append(f"weights={embedded.manifest_digest()}")
    return name + "-" + hashlib.sha256("\n".join(identity).encode()).hexdigest()[:8]
