"""Checkpoints that survive faults: atomic writes, a periodic and an on-interrupt last.ckpt, corrupt-file recovery.

- `AtomicCheckpointIO`: every checkpoint is written under a temporary name beside its final place and
  renamed into place, so a kill while writing leaves the previous file, never half of one, and nothing is
  staged elsewhere ($TMPDIR may be small; a killed save would leak a checkpoint-sized file there).
  A save that fails (a full disk) is one error naming the file. `remove_temporaries` clears what a
  killed save left in a run's folder.
- `LastCheckpoint`: writes `last.ckpt` every `every_n_steps` optimiser steps and when SIGTERM (a
  cluster's preemption), SIGINT (Ctrl-C) or a failing tracking store stops training; Lightning stops
  after the current step.
- `resumable_checkpoint`: the newest checkpoint that loads (weights only); an unreadable one is moved
  aside to `<name>.corrupt` with a warning naming it.
"""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lightning_m2s.errors import M2SError
from lightning_m2s.files import temporary

log = logging.getLogger(__name__)


class CheckpointWriteError(M2SError):
    """A checkpoint that could not be written (no space left, a read-only folder)."""


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        if "://" in str(path):  # object storage: fsspec's own transaction
            return super().save_checkpoint(checkpoint, path, storage_options)
        # Lightning's local save goes through an fsspec transaction, which stages the whole file in $TMPDIR
        # and copies it over: write straight into a sibling instead.
        path = Path(path)
        try:
            with temporary(path) as tmp, open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
        except (OSError, RuntimeError) as err:  # torch reports a failed write as a RuntimeError
            raise CheckpointWriteError(f"cannot write checkpoint {path}: {_reason(err)}; earlier "
                                       "checkpoints are intact, run the same command again to resume") from err


def _reason(err: BaseException | None) -> str:
    """The OS's reason for a failed write: torch's writer reports it as a RuntimeError whose context is it."""
    first = err
    while err is not None:
        if isinstance(err, OSError) and err.errno:
            return os.strerror(err.errno).lower()
        err = err.__cause__ or err.__context__
    return str(first).strip().splitlines()[-1] if str(first).strip() else type(first).__name__


def remove_temporaries(folder: Path) -> None:
    """Delete the temporary files (`.<name>.*.tmp`) that saves killed mid-write left in `folder`."""
    for tmp in Path(folder).glob(".*.ckpt.*.tmp"):
        log.info("removing %s, left by a save that was interrupted", tmp)
        tmp.unlink(missing_ok=True)


class LastCheckpoint(L.Callback):
    """The one writer of `last.ckpt` (what a run resumes from): every `every_n_steps` steps (0: never), after
    each validation of a fit, at its end, and on SIGTERM / SIGINT."""

    def __init__(self, path: Path, every_n_steps: int):
        self.path, self.every_n_steps = Path(path), int(every_n_steps)
        self._saved_step = -1

    def _save(self, trainer) -> None:
        if trainer.global_step != self._saved_step:
            trainer.save_checkpoint(self.path)
            self._saved_step = trainer.global_step

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step  # optimiser steps: with gradient accumulation several batches share one
        if self.every_n_steps and step and step % self.every_n_steps == 0:
            self._save(trainer)

    def on_validation_end(self, trainer, module) -> None:
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            self._save(trainer)

    def on_train_end(self, trainer, module) -> None:
        self._save(trainer)

    def on_exception(self, trainer, module, exception: BaseException) -> None:
        if trainer.state.fn != "fit":
            return
        # a signal, or a tracking store that failed under a healthy run: what trained so far is worth keeping
        from lightning_m2s.tracking import store_failure

        if isinstance(exception, (SIGTERMException, KeyboardInterrupt)) or store_failure(exception, "") is not None:
            trainer.save_checkpoint(self.path)


def _loads(path: Path) -> bool:
    try:
        torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return True
    except Exception:  # noqa: BLE001 - truncated, empty, not a checkpoint
        return False


def resumable_checkpoint(folder: Path) -> Path | None:
    """The newest of `folder`'s last.ckpt / best.ckpt that loads; unreadable ones become `*.corrupt`."""
    found = sorted((p for p in (folder / "last.ckpt", folder / "best.ckpt") if p.is_file()),
                   key=lambda p: p.stat().st_mtime, reverse=True)
    for path in found:
        if _loads(path):
            return path
        aside = path.with_name(path.name + ".corrupt")
        path.replace(aside)
        log.warning("%s is corrupt (truncated or not a checkpoint): moved to %s", path, aside)
    if found:
        log.warning("no readable checkpoint left in %s: training starts from the beginning", folder)
    return None


class SignalLog:
    """Remembers whether SIGINT arrived (Lightning turns Ctrl-C into exit(1), which hides it) while
    keeping its behaviour (KeyboardInterrupt); SIGTERM is Lightning's own (trainer.received_sigterm)."""

    def __init__(self):
        self.sigint = False
        self._previous = None

    def __enter__(self):
        import threading

        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._on_sigint)
        return self

    def _on_sigint(self, signum, frame):
        self.sigint = True
        raise KeyboardInterrupt

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def interrupt_signal(trainer: L.Trainer, signals: SignalLog, exception: BaseException) -> int | None:
    """The signal that stopped this run, or None when the exception was something else."""
    if isinstance(exception, SIGTERMException) or trainer.received_sigterm:
        return signal.SIGTERM
    if signals.sigint or isinstance(exception, KeyboardInterrupt):
        return signal.SIGINT
    return None

