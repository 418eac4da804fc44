"""Standard diffusion training (paper Eq. 1): sigma sampled per clip, SVD's weighted v-prediction loss.

Evaluated with `eval.steps` Euler steps (Tables 5 and 10: 1, 5 or 25)."""

from __future__ import annotations

from lightning_m2s.modules.base import StereoModule
from lightning_m2s.objective import sample_sigma


class StandardDiffusionModule(StereoModule):
    def compute_loss(self, batch):
        target = self.model.encode_target(batch.right)  # [B, T, 4, h, w]
        cond = self.conditioning(batch)
        sigma = sample_sigma(target.shape[0], self.loss_cfg["p_mean"], self.loss_cfg["p_std"],
                             self.model.denoiser.sigma_min, self.model.denoiser.sigma_max, device=target.device)
        loss = self.model.denoiser.diffusion_loss(target, cond, sigma).mean()
        return loss, {"sigma_mean": sigma.mean()}
