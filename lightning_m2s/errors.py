"""One exception hierarchy for errors the user can cause (bad files, config keys, values), and Interrupted."""

import signal
from pathlib import Path


class M2SError(Exception):
    """Base of every error a user can cause; the message names the file or key."""


class ConfigError(M2SError, KeyError):
    """An unknown or invalid config key or value."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class DataError(M2SError, ValueError):
    """A missing, corrupt or inconsistent input file or sample."""


class GeometryError(M2SError, ValueError):
    """Invalid depth, disparity or geometry parameters (NaN, negative, D_max <= 0)."""


class ModelError(M2SError, ValueError):
    """A checkpoint or model directory that cannot be used."""


class Interrupted(KeyboardInterrupt):
    """Stopped by SIGTERM or SIGINT. Not an Exception, so a sweep does not treat it as one trial's error
    and go on; a KeyboardInterrupt, so Optuna marks the running trial failed before re-raising it. The
    CLI exits 128 + signal number: 143 for SIGTERM, 130 for SIGINT."""

    def __init__(self, signum: int, checkpoint: Path | None):
        self.signum, self.checkpoint = int(signum), checkpoint
        saved = f"saved {checkpoint}; run the same command again to resume" if checkpoint else "nothing was saved"
        super().__init__(f"stopped by {signal.Signals(signum).name}: {saved}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum
