"""Experiment configs: OmegaConf YAML with a `base_config` chain, dotlist overrides, unknown keys fail.

An experiment file names its parent with `base_config: <file>` (relative to itself) and holds only
its changes; the chain ends at `experiments/base.yaml`, which has every key with a short reason
beside it. Keys that are not in the base are errors naming the key and the file, so a typo never
silently does nothing. A mapping that is empty (`{}`) in the base is free-form (e.g. keyword
arguments passed through to a library); everything else is checked.

base.yaml is also the only place a default is written: code that builds from a partial section (a
module's `loss:`, the refiner's `model:`) fills it with `defaults(section)`.
"""

from __future__ import annotations

import copy
import functools
import logging
import os
import re
from pathlib import Path
from typing import Iterable

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from lightning_m2s.errors import ConfigError

PROJECT_ROOT = Path(__file__).resolve().parents[1]  # the package's checkout: experiments/, sweeps/, notebooks/
EXPERIMENTS_DIR = PROJECT_ROOT / "experiments"
BASE_FILE = EXPERIMENTS_DIR / "base.yaml"
SWEEPS_DIR = PROJECT_ROOT / "sweeps"
MAX_CHAIN = 16
ROOT_ENV = "M2S_ROOT"
NUMBER_OR_LIST = {"module.eval.steps"}  # keys that take one number or a list of numbers
# Project keys that lived in `trainer:` (now Lightning's keyword arguments only): an older experiment file or
# command line still works, with a warning naming the new key.
MOVED_KEYS = {f"trainer.{old}": f"checkpoint.{new}" for old, new in [
    ("monitor", "monitor"), ("monitor_mode", "monitor_mode"), ("resume", "resume"),
    ("checkpoint_every_n_steps", "every_n_steps"), ("init_from", "init_from")]}
log = logging.getLogger(__name__)


def work_root() -> Path:
    """Where runs write (mlflow.db, mlartifacts/, optuna.db, outputs/): $M2S_ROOT, else the working
    directory. Never the installed package's folder, so two checkouts sharing a virtual environment
    keep their own stores. $M2S_ROOT must be an existing folder: a mistyped one would silently start an
    empty store."""
    root = os.environ.get(ROOT_ENV)
    if not root:
        return Path.cwd().resolve()
    path = Path(root).expanduser().resolve()
    if not path.is_dir():
        what = "is a file, not a folder" if path.exists() else "does not exist"
        raise ConfigError(f"{ROOT_ENV}={root} {what}: point it at the folder that holds (or is to hold) your stores "
                          f"(mlflow.db, optuna.db, outputs/); create a new one first (mkdir -p)")
    return path


def resolve_file(name: str | Path, folder: Path, kind: str) -> Path:
    """A path as given, or `folder/<name>.yaml` for a bare name like `tiny`."""
    candidates = [Path(name), folder / name, folder / f"{name}.yaml"]
    for path in candidates:
        if path.is_file():
            return path.resolve()
    available = sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []
    raise ConfigError(f"no {kind} named {str(name)!r} (looked in {folder}); available: {available}")


@functools.cache
def _base_defaults() -> dict:
    cfg = _read_yaml(BASE_FILE)
    cfg.pop("base_config", None)
    return to_container(cfg)


def defaults(section: str) -> dict:
    """One section of experiments/base.yaml, resolved, as a new dict: defaults("model"), defaults("module.loss")."""
    node = _base_defaults()
    for key in section.split("."):
        node = node[key]
    return copy.deepcopy(node)


def with_defaults(section: str, given: dict | None) -> dict:
    """`given` (a partial config section) over base.yaml's defaults of `section`; an unknown key is an error."""
    settings = defaults(section)
    unknown = sorted(set(given or {}) - set(settings))
    if unknown:
        raise ConfigError(f"{section}: unknown key(s) {unknown}; known keys: {sorted(settings)}")
    return {**settings, **(given or {})}


def _moved_keys(update: DictConfig, source: str) -> DictConfig:
    """`update` with the keys of MOVED_KEYS under their new names (a warning names each)."""
    for old, new in MOVED_KEYS.items():
        section, key = old.split(".")
        if section in update and isinstance(update[section], DictConfig) and key in update[section]:
            log.warning("%s: %s is now %s", source, old, new)
            value = update[section].pop(key)
            OmegaConf.update(update, new, value, force_add=True)
    return update


def _read_yaml(path: Path) -> DictConfig:
    try:
        cfg = OmegaConf.load(path)
    except (OSError, OmegaConfBaseException, ValueError) as err:
        raise ConfigError(f"{path}: cannot read YAML: {err}") from err
    if not isinstance(cfg, DictConfig):
        raise ConfigError(f"{path}: an experiment file must be a mapping, got {type(cfg).__name__}")
    return cfg


def _chain(path: Path) -> list[tuple[Path, DictConfig]]:
    """[(base.yaml, cfg), ..., (path, cfg)]: the files of the base_config chain, root first."""
    chain = []
    while True:
        cfg = _read_yaml(path)
        chain.append((path, cfg))
        parent = cfg.pop("base_config", None)
        if parent is None:
            return chain[::-1]
        if len(chain) >= MAX_CHAIN or any(p == (path.parent / parent).resolve() for p, _ in chain):
            raise ConfigError(f"{path}: base_config chain loops or is deeper than {MAX_CHAIN}")
        path = (path.parent / parent).resolve()
        if not path.is_file():
            raise ConfigError(f"{chain[-1][0]}: base_config {parent!r} does not exist ({path})")


def _freeze_schema(node: DictConfig | ListConfig) -> None:
    """Struct mode on every mapping of the base, except empty ones (free-form keyword arguments)."""
    if isinstance(node, DictConfig):
        OmegaConf.set_struct(node, len(node) > 0)
        for key in node:
            child = node._get_node(key)
            if isinstance(child, (DictConfig, ListConfig)):
                _freeze_schema(child)


def _merge(base: DictConfig, update: DictConfig | dict, source: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, update)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or getattr(err, "key", None)
        reason = str(err).splitlines()[0]
        raise ConfigError(f"{source}: unknown or invalid key {key!r}: {reason}") from err


def _check_types(base: DictConfig, cfg: DictConfig, prefix: str = "") -> None:
    """A key whose base value is a number or a boolean must stay one (null allowed for numbers): a typo
    like `trainer.max_steps=abc` is an error here, not a TypeError deep inside a run."""
    for key in base:
        if key not in cfg:
            continue
        default, value = base._get_node(key), cfg._get_node(key)
        name = f"{prefix}{key}"
        if isinstance(default, DictConfig) and isinstance(value, DictConfig):
            _check_types(default, value, f"{name}.")
            continue
        if isinstance(default, (DictConfig, ListConfig)) or default._is_interpolation():
            continue
        d = default._value()
        v = value if isinstance(value, (DictConfig, ListConfig)) else value._value()
        number = lambda x: isinstance(x, (int, float)) and not isinstance(x, bool)  # noqa: E731
        if isinstance(d, bool) and not isinstance(v, bool):
            raise ConfigError(f"{name}={v!r}: must be true or false (base.yaml: {d})")
        numbers = name in NUMBER_OR_LIST and isinstance(v, ListConfig) and all(number(x) for x in v)
        if number(d) and not (v is None or number(v) or numbers):
            raise ConfigError(f"{name}={v!r}: must be a number (base.yaml: {d})")


def load_config(experiment: str | Path, overrides: Iterable[str] = ()) -> DictConfig:
    """Load an experiment (a name in experiments/ or a path), apply dotlist overrides, resolve it."""
    path = resolve_file(experiment, EXPERIMENTS_DIR, "experiment")
    chain = _chain(path)
    cfg = chain[0][1]
    _freeze_schema(cfg)
    base = cfg.copy()
    for file, update in chain[1:]:
        cfg = _merge(cfg, _moved_keys(update, str(file)), str(file))
    overrides = list(overrides)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
    try:
        dotlist = OmegaConf.from_dotlist(overrides)
    except OmegaConfBaseException as err:
        raise ConfigError(f"command-line overrides: {err}") from err
    cfg = _merge(cfg, _moved_keys(dotlist, "command line"), "command-line override")
    _check_types(base, cfg)
    try:
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as err:
        raise ConfigError(f"{path}: cannot resolve interpolation: {err}") from err
    cfg.meta.experiment = path.stem
    if cfg.meta.run_name is not None:
        check_name(str(cfg.meta.run_name), "meta.run_name")
    return cfg


def check_name(name: str, key: str) -> str:
    """A name that becomes a folder (run, arm, study): letters, digits, '.', '_', '-' only, so it can
    never point outside the outputs folder."""
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name) or set(name) == {"."}:
        raise ConfigError(f"{key} {name!r}: use letters, digits, '.', '_' and '-' only (it names a folder)")
    return name


def to_container(cfg: DictConfig | ListConfig) -> dict:
    """The resolved config as plain Python containers (for **kwargs and for logging)."""
    return OmegaConf.to_container(cfg, resolve=True)


def flatten(cfg: DictConfig | dict, prefix: str = "") -> dict[str, object]:
    """{'a.b.c': value} for tracking params."""
    data = to_container(cfg) if isinstance(cfg, DictConfig) else cfg
    flat: dict[str, object] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat
