"""Checks that a local directory is an SVD checkpoint in diffusers format (e.g. img2vid-xt).

Expected layout (what `StableVideoDiffusionPipeline.save_pretrained` writes):
    unet/config.json               UNetSpatioTemporalConditionModel
    vae/config.json                AutoencoderKLTemporalDecoder
    image_encoder/config.json      CLIPVisionModelWithProjection
    feature_extractor/preprocessor_config.json   CLIPImageProcessor
    scheduler/scheduler_config.json              EulerDiscreteScheduler (not read by the model)
Nothing is downloaded: hub ids are not accepted here (no model hub is reachable).
"""

from __future__ import annotations

import json
from pathlib import Path

from lightning_m2s.errors import ModelError

COMPONENT_FILES = {
    "unet": ("unet/config.json", "UNetSpatioTemporalConditionModel"),
    "vae": ("vae/config.json", "AutoencoderKLTemporalDecoder"),
    "image_encoder": ("image_encoder/config.json", None),
    "feature_extractor": ("feature_extractor/preprocessor_config.json", None),
    "scheduler": ("scheduler/scheduler_config.json", None),
}


def check_svd_directory(path: str | Path, components=("unet", "vae", "image_encoder", "feature_extractor")) -> Path:
    """Return the directory as a Path, or raise ModelError naming the path and what is missing."""
    root = Path(path).expanduser()
    if not root.exists():
        hint = " (hub ids cannot be downloaded here: pass a local directory)" if "/" in str(path) and not str(path).startswith(("/", ".", "~")) else ""
        raise ModelError(f"SVD checkpoint {root}: no such directory{hint}")
    if not root.is_dir():
        raise ModelError(f"SVD checkpoint {root}: not a directory")
    missing = [COMPONENT_FILES[c][0] for c in components if not (root / COMPONENT_FILES[c][0]).is_file()]
    if missing:
        raise ModelError(
            f"{root} is not an SVD checkpoint in diffusers format: missing {', '.join(missing)} "
            f"(expected subfolders {', '.join(components)})"
        )
    for c in components:
        rel, expected_class = COMPONENT_FILES[c]
        if expected_class is None:
            continue
        try:
            cls = json.loads((root / rel).read_text()).get("_class_name")
        except (OSError, json.JSONDecodeError) as err:
            raise ModelError(f"{root / rel}: unreadable config: {err}") from err
        if cls is not None and cls != expected_class:
            raise ModelError(f"{root / rel}: _class_name is {cls!r}, expected {expected_class!r} (not an SVD checkpoint)")
    return root
