"""Cross-attention context (one embedding per left frame) and SVD's added_time_ids.

- `CLIPFrameEmbedding`: SVD's image encoder (CLIPVisionModelWithProjection from `image_encoder/`,
  normalisation from `feature_extractor/`), resized to 224 px as SVD's pipeline and the released code
  (Gaussian blur, then bicubic with align_corners, kornia's recipe), on EVERY left frame (M2SVid),
  no noise -> [B*T, 1, D].
- `PooledFrameEmbedding`: the embedded default's stand-in. Each frame is area-pooled to a tiny
  grid and mapped by a FIXED random projection (seeded, a buffer, never trained) to D, then
  normalised to unit RMS. Why not a learned token: a token carries no information about the
  frame, whereas this keeps the real model's data flow (one content-dependent embedding per left
  frame, frozen, so "only the UNet trains" stays true) at no cost and deterministically.
- `added_time_ids`: SVD's vector conditioning [fps_id, motion_bucket_id, cond_aug] per clip;
  the UNet embeds each with addition_time_embed_dim sinusoids (3 x 256 for img2vid-xt).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lightning_m2s.errors import ModelError
from lightning_m2s.models.pretrained import check_svd_directory


class CLIPFrameEmbedding(nn.Module):
    """Frozen CLIP image embedding of every frame: [B, T, 3, H, W] in [-1, 1] -> [B*T, 1, D]."""

    def __init__(self, encoder, image_mean, image_std, size: int = 224):
        super().__init__()
        self.encoder = encoder.requires_grad_(False).eval()
        self.size = size
        self.register_buffer("mean", torch.tensor(image_mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(image_std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    @classmethod
    def from_pretrained(cls, path: str | Path, variant: str | None = None) -> "CLIPFrameEmbedding":
        from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

        root = check_svd_directory(path, components=("image_encoder", "feature_extractor"))
        try:
            processor = CLIPImageProcessor.from_pretrained(root, subfolder="feature_extractor")
            encoder = CLIPVisionModelWithProjection.from_pretrained(root, subfolder="image_encoder", variant=variant)
        except (OSError, ValueError) as err:
            raise ModelError(f"{root}: cannot load the CLIP image encoder / feature extractor: {err}") from err
        crop = processor.crop_size  # a dict or SizeDict with "height", or an int (older releases)
        size = int(crop["height"]) if not isinstance(crop, int) else crop
        return cls(encoder, processor.image_mean, processor.image_std, size=size)

    def train(self, mode: bool = True):
        super().train(mode)
        self.encoder.eval()
        return self

    @property
    def dim(self) -> int:
        return int(self.encoder.config.projection_dim)

    @torch.no_grad()
    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        from diffusers.pipelines.stable_video_diffusion.pipeline_stable_video_diffusion import _resize_with_antialiasing

        x = frames.flatten(0, 1).float()  # [B*T, 3, H, W] in [-1, 1]
        x = _resize_with_antialiasing(x, (self.size, self.size))  # [B*T, 3, 224, 224]
        x = ((x + 1) / 2 - self.mean) / self.std
        dtype = next(self.encoder.parameters()).dtype
        emb = self.encoder(pixel_values=x.to(dtype)).image_embeds  # [B*T, D]
        return emb[:, None].to(frames.dtype)  # [B*T, 1, D]


POOLED_SUBFOLDER = "frame_embedding"  # of the shipped tiny SVD: config.json + projection.safetensors


class PooledFrameEmbedding(nn.Module):
    """Stand-in for CLIP: fixed random projection of an area-pooled frame -> [B*T, 1, D] (unit RMS)."""

    def __init__(self, dim: int, pool: int = 8, seed: int = 0):
        super().__init__()
        if dim < 1 or pool < 1:
            raise ModelError(f"frame embedding: dim {dim} and pool {pool} must be >= 1")
        self.pool, self.seed = pool, seed
        g = torch.Generator().manual_seed(seed)
        proj = torch.randn(3 * pool * pool, dim, generator=g) / (3 * pool * pool) ** 0.5
        self.register_buffer("proj", proj)  # saved with the model, never trained

    def save_pretrained(self, folder: str | Path) -> None:
        import json

        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(json.dumps({"dim": self.dim, "pool": self.pool, "seed": self.seed}, indent=2) + "\n")
        save_file({"proj": self.proj.contiguous()}, str(folder / "projection.safetensors"))

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> "PooledFrameEmbedding":
        import json

        from safetensors.torch import load_file

        folder = Path(folder)
        try:
            config = json.loads((folder / "config.json").read_text())
            proj = load_file(str(folder / "projection.safetensors"))["proj"]
            embedding = cls(int(config["dim"]), int(config["pool"]), int(config.get("seed", 0)))
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ModelError(f"{folder}: not a pooled frame embedding (config.json, projection.safetensors): {err}") from err
        if proj.shape != embedding.proj.shape:
            raise ModelError(f"{folder}: projection {tuple(proj.shape)} does not fit config {config}")
        embedding.proj.copy_(proj)
        return embedding

    @property
    def dim(self) -> int:
        return self.proj.shape[1]

    @torch.no_grad()
    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        x = F.adaptive_avg_pool2d(frames.flatten(0, 1).float(), self.pool).flatten(1)  # [B*T, 3*p*p]
        emb = x @ self.proj  # [B*T, D]
        emb = emb / emb.pow(2).mean(dim=1, keepdim=True).add(1e-6).sqrt()
        return emb[:, None].to(frames.dtype)  # [B*T, 1, D]


def added_time_ids(
    fps_id, motion_bucket_id, cond_aug, batch_size: int, device=None, dtype=torch.float32
) -> torch.Tensor:
    """SVD's added_time_ids [B, 3] = [fps_id, motion_bucket_id, cond_aug]; each a number or a [B] tensor.

    fps_id: the clip's sampling fps (released: training uniform 5-30, val/test 5, inference the
    video's fps); motion_bucket_id: 127; cond_aug: the noise level added to the condition videos."""
    cols = []
    for v in (fps_id, motion_bucket_id, cond_aug):
        v = torch.as_tensor(v, device=device, dtype=dtype)
        cols.append(v.expand(batch_size) if v.ndim == 0 else v.reshape(batch_size))
    return torch.stack(cols, dim=1)
