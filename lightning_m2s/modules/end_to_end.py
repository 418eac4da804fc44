"""End-to-end training (paper Eq. 5): fixed t = T; L_latent + L1 + LPIPS on the video decoded by the
frozen VAE decoder (gradients flow through it into the UNet, the only part that trains)."""

from __future__ import annotations

import torch

from lightning_m2s.metrics import lpips_network
from lightning_m2s.modules.base import StereoModule


def straight_through_clamp(x: torch.Tensor, lo: float = -1.0, hi: float = 1.0) -> torch.Tensor:
    """clamp(x, lo, hi) in the forward pass, the identity in the backward pass: LPIPS sees images in its
    range, and saturated pixels still pass a gradient back (a hard clamp would zero theirs)."""
    return x + (x.clamp(lo, hi) - x).detach()


class EndToEndModule(StereoModule):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # Not a submodule (object.__setattr__ bypasses nn.Module's registration): the shared frozen
        # network stays out of checkpoints, the optimiser and precision casts of the module.
        lpips = lpips_network(self.loss_cfg["lpips_net"]) if self.loss_cfg["lpips_weight"] > 0 else None
        object.__setattr__(self, "_lpips", lpips)

    def compute_loss(self, batch):
        w = self.loss_cfg
        target = self.model.encode_target(batch.right)  # [B, T, 4, h, w]
        latent_loss, pred = self.model.denoiser.latent_loss(target, self.conditioning(batch))
        video = self.model.decode(pred)  # [B, T, 3, H, W]
        l1 = (video - batch.right).abs().mean()
        parts = {"latent": latent_loss.mean(), "l1": l1}
        loss = w["latent_weight"] * parts["latent"] + w["l1_weight"] * l1
        if self._lpips is not None:
            lpips_net = self._lpips.to(video.device)
            frames = straight_through_clamp(video.flatten(0, 1)), batch.right.flatten(0, 1)  # [B*T, 3, H, W]
            parts["lpips"] = lpips_net(*frames).mean()
            loss = loss + w["lpips_weight"] * parts["lpips"]
        return loss, parts
