"""What the recipes share: settings with typed overrides, atomic files, resumable checkpoints, a progress bar."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from lightning_m2s.errors import ConfigError, ModelError
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
        import logging

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
