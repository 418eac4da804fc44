"""What both recipes share: settings with typed overrides, atomic files, resumable checkpoints, a progress bar."""

from __future__ import annotations

import json
import math
from pathlib import Path

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


def progress(total: int, initial: int, desc: str, enabled: bool = True):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True)


GRAD_CLIP = 1.0  # every recipe clips the gradient norm at 1, as the fine-tune does


def optimizer_step(loss: torch.Tensor, opt: torch.optim.Optimizer, params, recipe: str, step: int) -> None:
    """One clipped optimiser step on `loss`; a non-finite loss stops the recipe, naming the step."""
    if not torch.isfinite(loss):
        raise FloatingPointError(f"pretrain {recipe}: non-finite loss {float(loss)} at step {step + 1}")
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, GRAD_CLIP)
    opt.step()
