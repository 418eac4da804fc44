"""The model stage: one padded chunk -> the right view's latent (tile by tile, blended in latent space)
-> pixels, with the previous chunk's generated frames as its known frames (App. E)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lightning_m2s.convert.plan import Plan
from lightning_m2s.convert.report import StageTimes
from lightning_m2s.convert.schedule import Chunk, ramp, tile_grid
from lightning_m2s.convert.warp import WarpedChunk


@torch.no_grad()
def refine_latent(
    model,
    left: torch.Tensor,
    warped: torch.Tensor,
    mask: torch.Tensor,
    *,
    steps: int = 1,
    fps_id: float = 5.0,
    tile: int | None = None,
    tile_overlap: int | None = None,
    seed: int = 0,
    times: StageTimes | None = None,
) -> torch.Tensor:
    """The right view's latent of one padded chunk, tile by tile, blended in latent space.

    left, warped: [T, 3, H, W] in [-1, 1] with H, W multiples of `model_alignment(model)[0]`; mask bool
    [T, H, W]. Returns [1, T, c, H/d, W/d]. One tile (tile None or >= the frame) is plain inference.
    """
    T, _, H, W = left.shape
    times = times or StageTimes()
    down = int(model.vae.downscale)
    th, tw, ov, ys, xs = tile_grid(model, H, W, tile, tile_overlap)
    h, w = H // down, W // down
    acc = torch.zeros(1, T, model.vae.latent_channels, h, w, device=left.device)
    wsum = torch.zeros(1, 1, 1, h, w, device=left.device)
    for y in ys:
        for x in xs:
            sl = (slice(None), slice(None), slice(y, y + th), slice(x, x + tw))
            generator = torch.Generator().manual_seed(seed)  # each tile draws the same (tile-local) noise
            with times("encode"):  # the VAE encodings of both views and the frame embedding
                cond = model.build_conditioning(
                    left[sl][None], warped[sl][None], mask[:, y : y + th, x : x + tw][None, :, None],
                    fps_id=fps_id, cond_aug=model.cond_aug_eval, generator=generator,
                )
            with times("unet"):
                z = model.generate(cond, steps, generator)  # [1, T, c, th/d, tw/d]
            wy = ramp(th // down, ov // down, rise=y > 0, fall=y + th < H).to(z)
            wx = ramp(tw // down, ov // down, rise=x > 0, fall=x + tw < W).to(z)
            weight = (wy[:, None] * wx[None, :])[None, None, None]  # [1, 1, 1, th/d, tw/d]
            ly, lx = y // down, x // down
            acc[..., ly : ly + th // down, lx : lx + tw // down] += z * weight
            wsum[..., ly : ly + th // down, lx : lx + tw // down] += weight
    return acc / wsum


@torch.no_grad()
def decode_latent(model, latent: torch.Tensor, tile: int | None = None, tile_overlap: int | None = None,
                  decode_chunk_size: int | None = None) -> torch.Tensor:
    """[1, T, c, h, w] -> [T, 3, H, W] in [-1, 1]. With tiles, the blended latent is decoded window by
    window on the same tile grid and the pixels blended with linear ramps, so the VAE's attention spans a
    tile rather than the frame (a 2x VAE's mid-block attends over every cell: quadratic in the frame)."""
    down = int(model.vae.downscale)
    H, W = latent.shape[-2] * down, latent.shape[-1] * down
    th, tw, ov, ys, xs = tile_grid(model, H, W, tile, tile_overlap)
    if len(ys) * len(xs) == 1:
        return model.decode(latent, decode_chunk_size)[0].clamp(-1, 1)
    acc = torch.zeros(latent.shape[1], 3, H, W)
    wsum = torch.zeros(1, 1, H, W)
    for y in ys:
        for x in xs:
            z = latent[..., y // down : (y + th) // down, x // down : (x + tw) // down]
            video = model.decode(z, decode_chunk_size)[0].clamp(-1, 1).float().cpu()  # [T, 3, th, tw]
            weight = ramp(th, ov, rise=y > 0, fall=y + th < H)[:, None] * ramp(tw, ov, rise=x > 0, fall=x + tw < W)[None, :]
            acc[..., y : y + th, x : x + tw] += video * weight
            wsum[..., y : y + th, x : x + tw] += weight
    return acc / wsum


def _pad(x: torch.Tensor, hp: int, wp: int) -> torch.Tensor:
    """Replicate-pad the last two axes at the bottom / right to (hp, wp)."""
    H, W = x.shape[-2:]
    if (H, W) == (hp, wp):
        return x
    lead = x.shape[:-2]
    y = F.pad(x.reshape(-1, 1, H, W).float(), (0, wp - W, 0, hp - H), mode="replicate")
    return y.reshape(*lead, hp, wp).to(x.dtype)


class RefineStage:
    """The main thread's work on one chunk: known frames in, refine, decode, cross-fade the known frames.

    The known frames of a chunk are the previous chunk's generated frames, their mask empty (App. E, as
    `modules.base.replace_frames_with_truth` does in training); the stage holds them between calls.
    """

    def __init__(self, plan: Plan, model, times: StageTimes):
        self.plan, self.model, self.times = plan, model, times
        self.held: torch.Tensor | None = None  # [known, 3, H, W]: the last chunk's frames the next one gets as known

    def __call__(self, index: int, chunk: Chunk, frames: WarpedChunk) -> torch.Tensor:
        """The right frames this chunk writes, [written - start, 3, H, W] in [-1, 1] on the CPU."""
        plan, opts, known = self.plan, self.plan.opts, chunk.known
        if known:  # App. E: generated frames of the previous chunk as known frames, mask empty
            frames.warped[:known] = self.held
            frames.mask[:known] = False
        hp, wp = plan.padded
        left, warped, mask = (_pad(x, hp, wp).to(plan.device) for x in (frames.left, frames.warped, frames.mask))
        latent = refine_latent(
            self.model, left, warped, mask, steps=plan.steps, fps_id=plan.fps_id, tile=plan.tile,
            tile_overlap=opts.tile_overlap, seed=opts.seed + index, times=self.times,
        )
        with self.times("decode"):
            right = decode_latent(self.model, latent, plan.tile, opts.tile_overlap, opts.decode_chunk_size)
            right = right[:, :, : plan.height, : plan.width].float().cpu()  # [t, 3, H, W]

        # The known frames cross-faded from the last chunk's prediction to this one's (a model that does
        # not reproduce them exactly leaves a smaller seam), then this chunk's frames up to the next
        # chunk's start; the rest is held as its known frames
        if known and opts.blend_overlap:
            w = (torch.arange(1, known + 1, dtype=torch.float32) / (known + 1))[:, None, None, None]
            right[:known] = (1 - w) * self.held + w * right[:known]
        elif known:
            right[:known] = self.held
        n = chunk.written - chunk.start
        self.held = right[n:]
        return right[:n]
