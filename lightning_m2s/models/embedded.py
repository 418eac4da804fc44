"""The shipped tiny SVD (`model.pretrained: embedded`): where it lives and the hash check before loading.

Layout of `weights/` (written by `m2s pretrain export`, see lightning_m2s.pretrain.export):

    weights/manifest.json           sha256 of every file below, the recipes' settings, metrics, timings
    weights/tiny-svd/unet/          UNetSpatioTemporalConditionModel (8 input channels, fp16 safetensors)
    weights/tiny-svd/vae/           AutoencoderKLTemporalDecoder (2x down, 4 latent channels)
    weights/tiny-svd/frame_embedding/  the frozen pooled stand-in for CLIP (config.json, projection.safetensors)
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from lightning_m2s.errors import ModelError

EMBEDDED_NAME = "embedded"
WEIGHTS_ENV = "M2S_WEIGHTS_DIR"  # another weights/ folder (tests, a re-run of the recipes)


def weights_root() -> Path:
    return Path(os.environ.get(WEIGHTS_ENV) or Path(__file__).resolve().parents[2] / "weights")


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def manifest_digest() -> str:
    """The shipped weights' identity: the sha256 of their manifest (which holds every file's)."""
    path = weights_root() / "manifest.json"
    if not path.is_file():
        raise ModelError(f"{path}: the embedded weights' manifest is missing (run `make weights`)")
    return sha256(path)[:16]


def verify(root: Path) -> dict:
    """Check every file of `root`/tiny-svd against `root`/manifest.json; returns the manifest.

    A missing, extra or changed file is an error naming it."""
    manifest_path = root / "manifest.json"
    if not manifest_path.is_file():
        raise ModelError(f"{manifest_path}: the embedded weights' manifest is missing (run `make weights`)")
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ModelError(f"{manifest_path}: not a weights manifest ({err})") from err
    model_dir = root / manifest.get("directory", "tiny-svd")
    present = {p.relative_to(root).as_posix() for p in model_dir.rglob("*") if p.is_file()}
    for rel in sorted(set(files) - present):
        raise ModelError(f"{root / rel}: listed in {manifest_path} but missing")
    for rel in sorted(present - set(files)):
        raise ModelError(f"{root / rel}: not listed in {manifest_path} (an unverified file)")
    for rel, digest in sorted(files.items()):
        if sha256(root / rel) != digest:
            raise ModelError(f"{root / rel}: sha256 does not match {manifest_path} (a changed or corrupt file)")
    return manifest


def resolve_pretrained(name_or_path: str | os.PathLike) -> Path:
    """`embedded` -> the verified shipped directory; anything else -> that path, unchanged."""
    if str(name_or_path) != EMBEDDED_NAME:
        return Path(name_or_path).expanduser()
    root = weights_root()
    manifest = verify(root)
    return root / manifest.get("directory", "tiny-svd")
