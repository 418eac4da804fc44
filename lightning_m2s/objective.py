"""SVD's EDM v-prediction objective: scalings, sigma sampling, loss weighting, one-step and Euler sampling.

All noise-level arithmetic lives here (k-diffusion's `Denoiser` pattern): the network F is called
as F(c_in * x, c_noise, cond) and the denoiser returns c_skip * x + c_out * F. With SVD's
v-prediction (sigma_data = 1):

    c_skip = 1 / (s^2 + 1)     c_out = -s / sqrt(s^2 + 1)     c_in = 1 / sqrt(s^2 + 1)     c_noise = 0.25 ln s

One-step prediction (paper Eq. 4): x = 0 at sigma_max = 700, so the clean latent is
c_out * F(0, 0.25 ln 700) ~= -F, i.e. z_hat = -v_hat.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

SIGMA_MIN = 0.002  # img2vid-xt scheduler
SIGMA_MAX = 700.0
RHO = 7.0

Network = Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]


def _expand(sigma: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """sigma [B] or scalar -> broadcastable to x [B, ...]."""
    sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    if sigma.ndim == 0:
        sigma = sigma.expand(x.shape[0])
    return sigma.reshape(-1, *([1] * (x.ndim - 1)))


def edm_scalings(sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(c_skip, c_out, c_in, c_noise) for v-prediction EDM with sigma_data = 1, elementwise in sigma."""
    sigma = torch.as_tensor(sigma)
    if not sigma.is_floating_point():
        sigma = sigma.double()
    var = sigma**2 + 1
    c_skip = 1 / var
    c_out = -sigma / var.sqrt()
    c_in = 1 / var.sqrt()
    c_noise = 0.25 * sigma.log()
    return c_skip, c_out, c_in, c_noise


def loss_weight(sigma: torch.Tensor) -> torch.Tensor:
    """SVD's (sgm VWeighting) loss weight on the denoised latent: (s^2 + 1) / s^2 (about 1 at s = 700)."""
    return (sigma**2 + 1) / sigma**2


def sample_sigma(
    batch_size: int,
    p_mean: float = 1.0,
    p_std: float = 1.6,
    sigma_min: float = SIGMA_MIN,
    sigma_max: float = SIGMA_MAX,
    generator: torch.Generator | None = None,
    device=None,
) -> torch.Tensor:
    """EDM log-normal training sigmas, exp(p_mean + p_std * N(0, 1)), clamped to [sigma_min, sigma_max].
    Defaults are Hi3D's (the nearest released standard-diffusion config)."""
    log_sigma = p_mean + p_std * torch.randn(batch_size, generator=generator, device=device)
    return log_sigma.exp().clamp(sigma_min, sigma_max)


def karras_sigmas(
    steps: int, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX, rho: float = RHO
) -> torch.Tensor:
    """The `steps` Karras sigmas of img2vid-xt's EulerDiscreteScheduler, followed by a final 0: [steps + 1].

    With steps = 1 this is [sigma_max, 0]."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sigmas = (hi + ramp * (lo - hi)) ** rho
    return torch.cat([sigmas, sigmas.new_zeros(1)]).float()


class Denoiser:
    """Wraps the network F(x_in, c_noise, cond) into the EDM denoiser D(x, sigma, cond) -> clean latent."""

    def __init__(self, network: Network, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX):
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
        self.network = network
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond: Any = None) -> torch.Tensor:
        """x: [B, ...] noisy latent; sigma: [B] or scalar. Returns the denoised latent, shape of x."""
        sigma = torch.as_tensor(sigma, device=x.device, dtype=torch.float32)
        if sigma.ndim == 0:
            sigma = sigma.expand(x.shape[0])
        c_skip, c_out, c_in, c_noise = edm_scalings(sigma)
        F_x = self.network(_expand(c_in, x) * x, c_noise, cond)
        return _expand(c_skip, x) * x + _expand(c_out, x) * F_x

    # --- losses ---------------------------------------------------------------------------------
    def diffusion_loss(
        self,
        target: torch.Tensor,
        cond: Any,
        sigma: torch.Tensor,
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Standard diffusion loss (paper Eq. 1 in EDM form): weight(sigma) * ||D(z + sigma n) - z||^2,
        mean over all but the batch dim -> [B]."""
        noise = torch.randn_like(target) if noise is None else noise
        x_t = target + _expand(sigma, target) * noise
        denoised = self(x_t, sigma, cond)
        per_sample = ((denoised - target) ** 2).flatten(1).mean(dim=1)
        return loss_weight(sigma.to(per_sample)) * per_sample

    def latent_loss(self, target: torch.Tensor, cond: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Latent-only loss (paper Eq. 2): the one-step prediction against z, weighted (s^2+1)/s^2 at
        sigma_max. Returns (loss [B], prediction) so end-to-end training can decode the prediction."""
        pred = self.predict_one_step(target.shape, cond, device=target.device, dtype=target.dtype)
        sigma = torch.full((target.shape[0],), self.sigma_max, device=target.device)
        per_sample = ((pred - target) ** 2).flatten(1).mean(dim=1)
        return loss_weight(sigma) * per_sample, pred

    # --- prediction -----------------------------------------------------------------------------
    def predict_one_step(self, shape, cond: Any, device=None, dtype=torch.float32) -> torch.Tensor:
        """Paper Eq. 4: the denoiser output at sigma_max from a zero latent (= c_out * F ~= -v_hat)."""
        x = torch.zeros(shape, device=device, dtype=dtype)
        return self(x, torch.full((shape[0],), self.sigma_max, device=device), cond)

    def sample(
        self,
        shape,
        cond: Any,
        steps: int,
        noise: torch.Tensor | None = None,
        device=None,
        dtype=torch.float32,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Euler EDM sampling over img2vid-xt's Karras sigmas (sigma_min..sigma_max, rho 7, final 0).

        Starts from noise * sqrt(sigma_max^2 + 1) (diffusers' init_noise_sigma): `noise` [shape], or
        standard normal noise drawn on the CPU from `generator`. Never from zeros: multi-step sampling
        from a zero latent only follows the mean and never sharpens (Eq. 4's one step from zeros is
        `predict_one_step`)."""
        sigmas = karras_sigmas(steps, self.sigma_min, self.sigma_max).to(device)
        if noise is None:
            noise = torch.randn(shape, generator=generator)
        x = noise.to(device=device, dtype=dtype) * (sigmas[0] ** 2 + 1) ** 0.5
        for i in range(steps):
            sigma, sigma_next = sigmas[i], sigmas[i + 1]
            denoised = self(x, sigma.expand(shape[0]), cond)
            d = (x - denoised) / sigma  # dx/dsigma
            x = x + d * (sigma_next - sigma)
        return x
