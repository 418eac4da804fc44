"""A restricted unpickler for data formats that are pickles (Stereo4D's stereo flows): loading never runs code.

A pickle can name any importable callable and have it called on load (`os.system`, ...). This reader
allows only what numpy arrays and builtin containers need: numpy's array reconstruction, dtypes and
scalars. Anything else is an error naming the file and the refused global.
"""

from __future__ import annotations

import pickle
from pathlib import Path

from lightning_m2s.errors import DataError

ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("builtins", "dict"), ("builtins", "list"), ("builtins", "tuple"), ("builtins", "set"), ("builtins", "frozenset"),
    ("collections", "OrderedDict"),
}


class RefusedGlobal(pickle.UnpicklingError):
    pass


class _Restricted(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in ALLOWED:
            return super().find_class(module, name)
        raise RefusedGlobal(f"{module}.{name}")


def load_data_pickle(path: str | Path):
    """The pickle at `path`, if it holds only numpy arrays, numpy scalars/dtypes and builtin containers."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            return _Restricted(f).load()
    except RefusedGlobal as err:
        raise DataError(f"{path}: refused to load: the pickle names {err}, which is not a numpy array, dtype or "
                        "builtin container (a data file must not run code)") from err
    except Exception as err:  # noqa: BLE001 - truncated, not a pickle, ...
        raise DataError(f"cannot read {path}: {err}") from err
