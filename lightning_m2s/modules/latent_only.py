"""Latent-only training (paper Eq. 2): fixed t = T, zero latent input, L2 on the predicted clean latent."""

from __future__ import annotations

from lightning_m2s.modules.base import StereoModule


class LatentOnlyModule(StereoModule):
    def compute_loss(self, batch):
        target = self.model.encode_target(batch.right)  # [B, T, 4, h, w]
        loss, _ = self.model.denoiser.latent_loss(target, self.conditioning(batch))
        return loss.mean(), {}
