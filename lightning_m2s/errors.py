"""One exception hierarchy for errors the user can cause (bad files, config keys, values)."""


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
