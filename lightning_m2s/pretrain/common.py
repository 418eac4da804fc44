"""What the recipes share: the loop (`Recipe`, `run`), settings with typed overrides, atomic files,
resumable checkpoints, a progress bar."""

from __future__ import annotations

import json
import logging
import math
import signal
import time
from pathlib import Path

import numpy as np
import torch

from lightning_m2s.errors import ConfigError, Interrupted, ModelError
from lightning_m2s.files import temporary, write_json  # noqa: F401 - the recipes use both


def resolve_settings(defaults: dict, overrides: dict | None, recipe: str) -> dict:
    """`defaults` updated by `overrides`; unknown keys and values of the wrong type are errors naming the key."""
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - set(defaults))
    if unknown:
        raise ConfigError(f"pretrain {recipe}: unknown setting(s) {unknown}; known: {sorted(defaults)}")
    out = dict(defaults)
    for key, value in overrides.items():
        default = defaults[key]
        if isinstance(default, bool) or isinstance(value, bool):
            ok = isinstance(value, bool) and isinstance(default, bool)
        elif isinstance(default, (int, float)):
            ok = isinstance(value, (int, float)) and (isinstance(default, float) or float(value).is_integer())
            value = type(default)(value) if ok else value
        elif isinstance(default, (list, tuple)):
            ok = isinstance(value, (list, tuple))
            value = list(value) if ok else value
        else:
            ok = value is None or default is None or isinstance(value, type(default))
        if not ok:
            raise ConfigError(f"pretrain {recipe}: setting {key}={value!r} must be like its default {default!r}")
        out[key] = value
    return out


def lr_at(step: int, steps: int, lr: float, warmup: float = 0.05, floor: float = 0.05) -> float:
    """Linear warm-up over `warmup` of the steps, then cosine decay to `floor` x lr (step 0-based)."""
    warm = max(1, round(warmup * steps))
    if step < warm:
        return lr * (step + 1) / warm
    t = min(1.0, (step - warm) / max(1, steps - warm))
    return lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t)))


def adam(params, lr: float) -> torch.optim.Optimizer:
    try:  # fused Adam: much faster than the per-tensor loop on a CPU for hundreds of small tensors
        return torch.optim.Adam(params, lr=lr, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.Adam(params, lr=lr)


def save_checkpoint(path: Path, state: dict) -> None:
    """Atomically: a kill while writing leaves the previous checkpoint."""
    with temporary(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: Path, settings: dict) -> dict | None:
    """The resumable state at `path` when it was written with the same settings; None when there is none.

    Read with weights_only=True (tensors and builtin containers only: a file never runs code). A
    checkpoint of other settings is an error; an unreadable one is moved aside to `*.corrupt`."""
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - a torn file: keep it for inspection, start over
        path.replace(path.with_name(path.name + ".corrupt"))
        logging.getLogger(__name__).warning("%s is unreadable (%s): moved to %s.corrupt, starting over", path, err, path.name)
        return None
    if state.get("settings") != json.loads(json.dumps(settings)):
        raise ModelError(f"{path} was written with other settings; remove it (or use another --out) to start over")
    return state


class StepLog:
    """A recipe's per-step bookkeeping: step count, loss history, training seconds, the progress bar, the
    periodic checkpoint and the on_step hook. `state()` goes into the recipe's checkpoint, `restore` reads it.

    on_step(step, loss) runs after every step (and after that step's checkpoint): an exception it raises
    stops the run like a kill, with the last checkpoint kept."""

    def __init__(self, total: int, desc: str, checkpoint_every: int, progress: bool = True, on_step=None):
        self.total, self.desc, self.checkpoint_every = total, desc, checkpoint_every
        self.progress, self.on_step = progress, on_step
        self.step, self.history, self.train_s = 0, [], 0.0
        self._bar = None

    def state(self) -> dict:
        return {"step": self.step, "history": self.history, "train_s": self.train_s}

    def restore(self, state: dict) -> None:
        self.step, self.history, self.train_s = state["step"], state["history"], state["train_s"]

    def __enter__(self):
        if self.progress:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=self.total, initial=self.step, desc=self.desc, unit="step", dynamic_ncols=True)
        return self

    def __exit__(self, *exc):
        if self._bar is not None:
            self._bar.close()

    def record(self, loss: torch.Tensor, started: float, checkpoint) -> None:
        """After an optimiser step begun at perf_counter() `started`: count it, show it, and call
        `checkpoint()` every `checkpoint_every` steps (not after the last: the recipe then saves its result)."""
        self.step += 1
        self.train_s += time.perf_counter() - started
        self.history.append(float(loss.detach()))
        if self._bar is not None:
            self._bar.set_postfix(loss=f"{np.mean(self.history[-20:]):.4f}", refresh=False)
            self._bar.update(1)
        if self.step % self.checkpoint_every == 0 and self.step < self.total:
            checkpoint()
        if self.on_step is not None:
            self.on_step(self.step, self.history[-1])

    def summary(self, loss_name: str = "train_loss") -> dict:
        """The loss over the first and the last tenth of the steps, step count and timing (metrics.json)."""
        tenth = max(1, len(self.history) // 10)
        return {f"{loss_name}_first": float(np.mean(self.history[:tenth])),
                f"{loss_name}_last": float(np.mean(self.history[-tenth:])),
                "steps": self.step, "train_s": self.train_s, "step_s": self.train_s / max(1, self.step)}


GRAD_CLIP = 1.0  # every recipe clips the gradient norm at 1, as the fine-tune does


def optimizer_step(loss: torch.Tensor, opt: torch.optim.Optimizer, params, recipe: str, step: int) -> None:
    """One clipped optimiser step on `loss`; a non-finite loss stops the recipe, naming the step."""
    if not torch.isfinite(loss):
        raise FloatingPointError(f"pretrain {recipe}: non-finite loss {float(loss)} at step {step + 1}")
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, GRAD_CLIP)
    opt.step()


class Recipe:
    """One recipe for `run`: its settings, what it trains, its step, its evaluation and its result.

    A subclass sets `name` (`m2s pretrain NAME`), `defaults` (every setting) and `result` (the folder
    of `out` it writes last: its presence marks the recipe finished), and implements the methods below.
    `run` owns everything else: resume, learning rate, progress, checkpoints, signals, metrics.json."""

    name: str
    defaults: dict
    result: str

    def __init__(self, settings: dict | None = None):
        self.s = resolve_settings(self.defaults, settings, self.name)

    @property
    def total_steps(self) -> int:
        return self.s["steps"]

    def recorded_settings(self) -> dict:
        """settings.json (and the manifest): every setting, and what else the run depends on."""
        return dict(self.s)

    def setup(self, out: Path) -> None:
        """Build the models, the optimiser (`self.opt`) and the data: called once, before any step."""
        raise NotImplementedError

    def lr(self, step: int) -> float:
        return lr_at(step, self.s["steps"], self.s["lr"])

    def loss(self, step: int) -> torch.Tensor:
        """Draw a batch and return the scalar loss of optimiser step `step` (0-based)."""
        raise NotImplementedError

    def trained_parameters(self) -> list:
        raise NotImplementedError

    def state(self) -> dict:
        """What a checkpoint needs beyond the optimiser and the step log: weights, RNG states."""
        raise NotImplementedError

    def load_state(self, state: dict) -> None:
        raise NotImplementedError

    def start(self) -> dict:
        """Measured once before the first step (not again on resume): kept in the checkpoint and the metrics."""
        return {}

    def evaluate(self) -> dict:
        """The held-out metrics after the last step."""
        raise NotImplementedError

    def save(self, out: Path) -> None:
        """Write the result into `out`, the folder `result` last and atomically (`temporary`)."""
        raise NotImplementedError


class RecipeOnVAE(Recipe):
    """A recipe that starts from the VAE recipe's result (the prior, the decoder)."""

    def __init__(self, vae_dir: str | Path, settings: dict | None = None):
        super().__init__(settings)
        self.vae_dir = Path(vae_dir)

    def recorded_settings(self) -> dict:
        return {**self.s, "vae": str(self.vae_dir)}

    def check_vae(self) -> None:
        if not (self.vae_dir / "config.json").is_file():
            raise ModelError(f"pretrain {self.name}: {self.vae_dir} is not a trained VAE (no config.json); "
                             "run `m2s pretrain vae` first")


class _StopRequest:
    """SIGTERM / SIGINT noted by a handler; the loop checkpoints after the step it is in and stops."""

    def __init__(self):
        self.signum = None

    def __enter__(self):
        self._old = {sig: signal.signal(sig, self._note) for sig in (signal.SIGTERM, signal.SIGINT)}
        return self

    def _note(self, signum, frame):
        self.signum = signum

    def __exit__(self, *exc):
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


def run(recipe: Recipe, out: str | Path, on_step=None, progress: bool = True) -> dict:
    """Run (or resume, or find finished) `recipe` into `out`; returns its metrics.

    `out/checkpoint.pt` is written every `checkpoint_every` steps and on SIGTERM / SIGINT (then
    `Interrupted` is raised: the CLI exits 143 / 130); rerunning resumes from it. on_step(step, loss)
    runs after every step; an exception it raises stops the run like a kill (the last checkpoint stays)."""
    log = logging.getLogger(f"lightning_m2s.pretrain.{recipe.name}")
    out = Path(out)
    if (out / recipe.result / "config.json").is_file() and (out / "metrics.json").is_file():
        return json.loads((out / "metrics.json").read_text())
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    recipe.setup(out)
    write_json(out / "settings.json", recipe.recorded_settings())
    ckpt, total = out / "checkpoint.pt", recipe.total_steps
    steps = StepLog(total, f"pretrain {recipe.name}", recipe.s["checkpoint_every"], progress, on_step)
    state = load_checkpoint(ckpt, recipe.s)
    if state is not None:
        recipe.load_state(state)
        recipe.opt.load_state_dict(state["optimizer"])
        steps.restore(state)
        started = state["start"]
        log.info("pretrain %s: resuming %s at step %d of %d", recipe.name, out, steps.step, total)
    else:
        started = recipe.start()

    def checkpoint():
        save_checkpoint(ckpt, {**recipe.state(), "optimizer": recipe.opt.state_dict(), "settings": recipe.s,
                               "start": started, **steps.state()})

    params = recipe.trained_parameters()
    with steps, _StopRequest() as stop:
        while steps.step < total:
            t_step = time.perf_counter()
            for group in recipe.opt.param_groups:
                group["lr"] = recipe.lr(steps.step)
            loss = recipe.loss(steps.step)
            optimizer_step(loss, recipe.opt, params, recipe.name, steps.step)
            steps.record(loss, t_step, checkpoint)
            if stop.signum is not None and steps.step < total:
                checkpoint()
                raise Interrupted(stop.signum, ckpt)

    t_eval = time.perf_counter()
    metrics = {**started, **recipe.evaluate(), **steps.summary(), "eval_s": time.perf_counter() - t_eval,
               "torch": torch.__version__}
    write_json(out / "metrics.json", metrics)
    recipe.save(out)
    ckpt.unlink(missing_ok=True)
    log.info("pretrain %s done in %.0f s -> %s", recipe.name, time.perf_counter() - t_start, out / recipe.result)
    return metrics
