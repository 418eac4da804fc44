"""Stereo output layouts: full / half side-by-side, top-bottom, red-cyan anaglyph (Dubois), right only.

Frames are uint8 or float arrays `[T, H, W, 3]` (numpy or torch, last axis colour); outputs match the input type.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from lightning_m2s.errors import ConfigError

# Dubois' least-squares red-cyan projection (sRGB values in [0, 1]): out = L @ left + R @ right.
DUBOIS_LEFT = torch.tensor([[0.456, 0.500, 0.176], [-0.040, -0.038, -0.016], [-0.015, -0.021, -0.005]])
DUBOIS_RIGHT = torch.tensor([[-0.043, -0.088, -0.002], [0.378, 0.734, -0.018], [-0.072, -0.113, 1.226]])
FORMATS = ("sbs", "half-sbs", "top-bottom", "half-top-bottom", "anaglyph", "right")


def _to_float(x: torch.Tensor) -> torch.Tensor:
    return x.float() / 255.0 if x.dtype == torch.uint8 else x.float()


def _like(y: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    return (y.clamp(0, 1) * 255).round().to(torch.uint8) if ref.dtype == torch.uint8 else y


def anaglyph(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """Red-cyan anaglyph with Dubois' matrices, [..., H, W, 3]."""
    out = _to_float(left) @ DUBOIS_LEFT.T + _to_float(right) @ DUBOIS_RIGHT.T
    return _like(out, left)


def _half(x: torch.Tensor, axis: str) -> torch.Tensor:
    """Squeeze [T, H, W, 3] to half width or height (area filter), keeping the dtype."""
    T, H, W, _ = x.shape
    size = (H, max(1, W // 2)) if axis == "width" else (max(1, H // 2), W)
    y = F.interpolate(_to_float(x).permute(0, 3, 1, 2), size=size, mode="area").permute(0, 2, 3, 1)
    return _like(y, x)


def compose(left, right, layout: str):
    """Compose a stereo frame batch [T, H, W, 3] in the given layout (see FORMATS)."""
    if layout not in FORMATS:
        raise ConfigError(f"unknown stereo format {layout!r}; choose from {FORMATS}")
    as_numpy = isinstance(left, np.ndarray)
    left_t, right_t = torch.as_tensor(left), torch.as_tensor(right)
    if layout == "sbs":
        out = torch.cat([left_t, right_t], dim=2)
    elif layout == "half-sbs":
        out = torch.cat([_half(left_t, "width"), _half(right_t, "width")], dim=2)
    elif layout == "top-bottom":
        out = torch.cat([left_t, right_t], dim=1)
    elif layout == "half-top-bottom":
        out = torch.cat([_half(left_t, "height"), _half(right_t, "height")], dim=1)
    elif layout == "anaglyph":
        out = anaglyph(left_t, right_t)
    else:
        out = right_t
    return out.numpy() if as_numpy else out
