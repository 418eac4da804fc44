"""Stereo geometry: depth -> disparity, forward splatting left -> right, hole-mask closing and resizing.

Conventions (DESIGN.md): images are float `[..., C, H, W]`, disparity float `[..., H, W]` in pixels of
that image for the LEFT view. A left pixel at column x lands at column x - d of the right view; where
several land on one right pixel the nearest surface (largest disparity) wins (`forward_splat`), or, in
the M2SVid release's warp (`released_splat`), the later pixel in scan order.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from lightning_m2s.errors import GeometryError

# Contributions within this many pixels of disparity of the nearest surface at a target pixel count as
# the same surface and are blended; farther ones are occluded. One pixel keeps slanted surfaces smooth.
DEPTH_TOLERANCE = 1.0


def check_finite(name: str, x: torch.Tensor) -> None:
    if not torch.isfinite(x).all():
        bad = (~torch.isfinite(x)).sum().item()
        raise GeometryError(f"{name} has {bad} non-finite values (NaN or inf)")


def depth_to_disparity(
    depth: torch.Tensor,
    max_disparity: float,
    *,
    inverse: bool = False,
    convergence: float = 0.0,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Disparity in pixels `[T, H, W]` from a clip's depth `[T, H, W]` (paper Sec. 4).

    Inverse depth is normalised over the whole clip (one min and max for all frames, so the stereo
    effect does not flicker) to [0, max_disparity]: the nearest point of the clip gets max_disparity.
    `inverse=True` means `depth` is already inverse depth (relative disparity, as monocular depth
    networks such as Depth Anything output). `convergence` in [0, 1] moves the zero-parallax plane:
    the disparity of that fraction of max_disparity is subtracted, so nearer content pops out of the
    screen (negative values are allowed after the shift; the splat handles them).
    """
    if not max_disparity > 0:
        raise GeometryError(f"max_disparity must be > 0 pixels, got {max_disparity}")
    if not 0.0 <= convergence <= 1.0:
        raise GeometryError(f"convergence must be in [0, 1], got {convergence}")
    check_finite("depth", depth)
    depth = depth.float()
    if inverse:
        if (depth < 0).any():
            raise GeometryError("inverse depth must be >= 0")
        inv = depth
    else:
        if (depth <= 0).any():
            raise GeometryError("depth must be > 0 everywhere (use inverse=True for inverse depth)")
        inv = 1.0 / depth
    lo, hi = inv.min(), inv.max()
    normalised = (inv - lo) / (hi - lo).clamp_min(eps)  # a flat clip maps to 0 disparity
    return (normalised - convergence) * max_disparity


def _check_splat_inputs(image: torch.Tensor, disparity: torch.Tensor) -> None:
    if image.shape[:-3] != disparity.shape[:-2] or image.shape[-2:] != disparity.shape[-2:]:
        raise GeometryError(
            f"image {tuple(image.shape)} and disparity {tuple(disparity.shape)} do not match: expected "
            "image [..., C, H, W] and disparity [..., H, W]"
        )
    check_finite("disparity", disparity)


def forward_splat(image: torch.Tensor, disparity: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward-splat the left view to the right view.

    image `[..., C, H, W]` float, disparity `[..., H, W]` pixels -> (warped `[..., C, H, W]`,
    holes bool `[..., H, W]`, True where no left pixel landed). Sub-pixel targets are split over the
    two neighbouring columns (linear weights); a depth test keeps the nearest surface. Holes in
    `warped` are 0. Deterministic. RGB on the CPU without gradients runs a compiled loop (numba);
    otherwise a vectorised torch version (GPU, autograd, other channel counts). Both compute the same.
    """
    _check_splat_inputs(image, disparity)
    compiled = image.device.type == "cpu" and image.shape[-3] == 3 and not (image.requires_grad or disparity.requires_grad)
    return _splat_numba(image, disparity) if compiled else _splat_torch(image, disparity)


def _splat_torch(image: torch.Tensor, disparity: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    lead, (C, H, W) = image.shape[:-3], image.shape[-3:]
    N = math.prod(lead)
    img = image.reshape(N, C, H * W).float()
    d = disparity.reshape(N, H * W).float()
    x = torch.arange(W, device=d.device, dtype=d.dtype).repeat(H)  # column of each flat pixel
    row = torch.arange(H, device=d.device).repeat_interleave(W) * W  # flat offset of its row
    target = x - d
    left = torch.floor(target)
    frac = target - left
    base = torch.arange(N, device=d.device)[:, None] * (H * W)
    # 1. Two taps per source pixel: column floor(x - d) with weight 1 - frac, the next with frac.
    cols = torch.stack([left, left + 1], 0).long()  # [2, N, HW]
    weights = torch.stack([1 - frac, frac], 0)
    valid = (cols >= 0) & (cols < W) & (weights > 0)
    flat = (base + row + cols.clamp(0, W - 1)).reshape(-1)  # [2*N*HW]
    disp2 = d.expand(2, N, H * W).reshape(-1)
    valid = valid.reshape(-1)
    # 2. Depth test: the largest disparity reaching each target pixel is the visible surface.
    zbuf = torch.full((N * H * W,), -torch.inf, device=d.device, dtype=d.dtype)
    zbuf = zbuf.scatter_reduce(0, flat[valid], disp2[valid], reduce="amax")
    keep = valid & (disp2 >= zbuf[flat] - DEPTH_TOLERANCE)
    # 3. Accumulate weighted colours of the visible surface and normalise.
    w = (weights.reshape(-1) * keep).to(img.dtype)
    colours = img.permute(1, 0, 2).reshape(C, N * H * W).repeat(1, 2)  # [C, 2*N*HW], taps in order
    acc = torch.zeros(C, N * H * W, device=d.device, dtype=img.dtype).index_add(1, flat, colours * w)
    wsum = torch.zeros(N * H * W, device=d.device, dtype=img.dtype).index_add(0, flat, w)
    holes = wsum <= 0
    warped = acc / wsum.clamp_min(1e-12)
    warped = warped.reshape(C, N, H, W).permute(1, 0, 2, 3).reshape(*lead, C, H, W)
    return warped.to(image.dtype), holes.reshape(*lead, H, W)


_numba_kernel = None


def _get_numba_kernel():
    """Compile the loop once per process (cached on disk by numba afterwards)."""
    global _numba_kernel
    if _numba_kernel is None:
        import numba

        @numba.njit(cache=True, nogil=True, fastmath=True)
        def kernel(img, disp, out, holes, tol):  # img/out [N, 3, H, W] f32, disp [N, H, W] f32
            N, _, H, W = img.shape
            col = np.empty(W, dtype=np.int32)  # floor(x - d) per source column
            frac = np.empty(W, dtype=np.float32)
            zrow = np.empty(W, dtype=np.float32)  # nearest disparity reaching each target column
            acc = np.empty((W, 4), dtype=np.float32)  # row accumulator r, g, b, weight: stays in L1
            for n in range(N):
                for y in range(H):
                    zrow[:] = -np.inf
                    acc[:] = 0
                    for x in range(W):  # 1. taps and z-buffer of the nearest surface
                        d = disp[n, y, x]
                        t = np.float32(x) - d  # float32 like the torch path, so both floor alike
                        c0 = int(np.floor(t))
                        f = t - np.float32(c0)
                        col[x] = c0
                        frac[x] = f
                        if 0 <= c0 < W and d > zrow[c0]:
                            zrow[c0] = d
                        if f > 0 and 0 <= c0 + 1 < W and d > zrow[c0 + 1]:
                            zrow[c0 + 1] = d
                    for x in range(W):  # 2. blend the two taps of the visible surface
                        d, c0, f = disp[n, y, x], col[x], frac[x]
                        r, g, b = img[n, 0, y, x], img[n, 1, y, x], img[n, 2, y, x]
                        if 0 <= c0 < W and d >= zrow[c0] - tol:
                            w0 = np.float32(1) - f
                            a = acc[c0]
                            a[0] += w0 * r
                            a[1] += w0 * g
                            a[2] += w0 * b
                            a[3] += w0
                        c1 = c0 + 1
                        if f > 0 and 0 <= c1 < W and d >= zrow[c1] - tol:
                            a = acc[c1]
                            a[0] += f * r
                            a[1] += f * g
                            a[2] += f * b
                            a[3] += f
                    for x in range(W):  # 3. normalise; no weight = hole (0)
                        s = acc[x, 3]
                        holes[n, y, x] = s <= 0
                        inv = np.float32(1) / s if s > 0 else np.float32(0)
                        out[n, 0, y, x] = acc[x, 0] * inv
                        out[n, 1, y, x] = acc[x, 1] * inv
                        out[n, 2, y, x] = acc[x, 2] * inv

        _numba_kernel = kernel
    return _numba_kernel


def _splat_numba(image: torch.Tensor, disparity: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    lead, (C, H, W) = image.shape[:-3], image.shape[-3:]
    img = np.ascontiguousarray(image.detach().reshape(-1, C, H, W).float().numpy())
    disp = np.ascontiguousarray(disparity.detach().reshape(-1, H, W).float().numpy())
    out = np.empty_like(img)  # every element is written by the kernel
    holes = np.empty(disp.shape, dtype=np.bool_)
    _get_numba_kernel()(img, disp, out, holes, np.float32(DEPTH_TOLERANCE))
    warped = torch.from_numpy(out).reshape(*lead, C, H, W).to(image.dtype)
    return warped, torch.from_numpy(holes).reshape(*lead, H, W)


def splat_reference(image: np.ndarray, disparity: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The same splat as a plain per-pixel Python loop, for one frame: image [C, H, W], disparity [H, W].

    Deliberately simple and slow; the oracle for tests and the baseline of `m2s bench splat`.
    """
    C, H, W = image.shape
    out = np.zeros((C, H, W), dtype=np.float64)
    wsum = np.zeros((H, W), dtype=np.float64)
    zbuf = np.full((H, W), -np.inf)
    taps = []
    for y in range(H):
        for x in range(W):
            t = x - float(disparity[y, x])
            c0 = math.floor(t)
            for c, w in ((c0, 1.0 - (t - c0)), (c0 + 1, t - c0)):
                if 0 <= c < W and w > 0:
                    taps.append((y, x, c, w))
                    zbuf[y, c] = max(zbuf[y, c], disparity[y, x])
    for y, x, c, w in taps:
        if disparity[y, x] >= zbuf[y, c] - DEPTH_TOLERANCE:
            wsum[y, c] += w
            out[:, y, c] += w * image[:, y, x]
    holes = wsum <= 0
    out[:, ~holes] /= wsum[~holes]
    return out.astype(np.float32), holes


def released_splat(image: torch.Tensor, disparity: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The M2SVid release's warp (its `scatter_image`), vectorised.

    image `[..., C, H, W]`, disparity `[..., H, W]` -> (warped `[..., C, H, W]`, holes bool `[..., H, W]`).
    A left pixel at x with disparity d = floor(d) + f writes its colour to column x - floor(d) with
    weight 1 - f and to column x - floor(d) - 1 with weight f. There is no depth test: within each of
    the two taps, where several pixels write one target the later one in scan order (row by row, left
    to right) wins, a zero-weight write included; the two taps' colours and weights then add up and
    are normalised. Pixels with no weight are holes (0 in `warped`). As `forward_splat`: RGB on the
    CPU without gradients runs a compiled loop (numba), otherwise a vectorised torch version
    (differentiable in `image`); both compute the same.
    """
    _check_splat_inputs(image, disparity)
    grad = image.requires_grad or disparity.requires_grad
    compiled = image.device.type == "cpu" and image.shape[-3] == 3 and not grad
    return _released_numba(image, disparity) if compiled else _released_torch(image, disparity)


def _released_torch(image: torch.Tensor, disparity: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    lead, (C, H, W) = image.shape[:-3], image.shape[-3:]
    P = math.prod(lead) * H * W  # pixels of all frames, flat in scan order
    img = image.reshape(-1, C, H * W).transpose(0, 1).reshape(C, P)  # [C, P]
    d = disparity.reshape(P).float()
    x = torch.arange(W, device=d.device).repeat(P // W)  # column of each pixel
    row_start = torch.arange(0, P, W, device=d.device).repeat_interleave(W)  # flat index of its row's column 0
    whole = torch.floor(d)
    frac = d - whole
    near = x - whole.long()  # the tap at x - floor(d)
    acc, wsum = img.new_zeros(C, P), img.new_zeros(P)
    for col, weight in ((near, 1 - frac), (near - 1, frac)):
        # a pixel lands in its own row; taps outside the frame go to a spare slot P (no boolean indexing: fast)
        target = torch.where((col >= 0) & (col < W), row_start + col, P)
        # 1. The last writer of each target: the largest source column (float is exact below 2^24; -1 = none)
        last = torch.full((P + 1,), -1.0, device=d.device).scatter_reduce(0, target, x.float(), "amax")[:P]
        hit = last >= 0
        source = row_start + last.long().clamp_min(0)  # its flat index (the target's row)
        w = (weight.index_select(0, source) * hit).to(img.dtype)
        # 2. Its colour times its weight adds to the target; so do the other tap's
        acc = acc + img.index_select(1, source) * w
        wsum = wsum + w
    holes = wsum <= 0
    warped = acc / wsum.clamp_min(1e-12)  # holes: 0 / eps = 0
    warped = warped.reshape(C, -1, H * W).transpose(0, 1).reshape(*lead, C, H, W)
    return warped.to(image.dtype), holes.reshape(*lead, H, W)


_released_kernel = None


def _released_numba(image: torch.Tensor, disparity: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    global _released_kernel
    if _released_kernel is None:
        import numba

        @numba.njit(cache=True, nogil=True, fastmath=True)
        def kernel(img, disp, out, holes):  # img/out [N, 3, H, W] f32, disp [N, H, W] f32
            N, _, H, W = img.shape
            taps = np.empty((2, W, 4), dtype=np.float32)  # per tap and target: r, g, b times weight, weight
            for n in range(N):
                for y in range(H):
                    taps[:] = 0
                    for x in range(W):  # scan order: a later write replaces an earlier one
                        d = disp[n, y, x]
                        whole = np.floor(d)
                        f = d - whole
                        for k in range(2):  # x - floor(d) with 1 - f, x - floor(d) - 1 with f
                            c = x - int(whole) - k
                            if 0 <= c < W:
                                w = np.float32(1) - f if k == 0 else f
                                taps[k, c, 0] = w * img[n, 0, y, x]
                                taps[k, c, 1] = w * img[n, 1, y, x]
                                taps[k, c, 2] = w * img[n, 2, y, x]
                                taps[k, c, 3] = w
                    for x in range(W):  # the two taps add up; normalise; no weight = hole (0)
                        s = taps[0, x, 3] + taps[1, x, 3]
                        holes[n, y, x] = s <= 0
                        inv = np.float32(1) / s if s > 0 else np.float32(0)
                        for c in range(3):
                            out[n, c, y, x] = (taps[0, x, c] + taps[1, x, c]) * inv

        _released_kernel = kernel
    lead, (C, H, W) = image.shape[:-3], image.shape[-3:]
    img = np.ascontiguousarray(image.detach().reshape(-1, C, H, W).float().numpy())
    disp = np.ascontiguousarray(disparity.detach().reshape(-1, H, W).float().numpy())
    out = np.empty_like(img)  # every element is written by the kernel
    holes = np.empty(disp.shape, dtype=np.bool_)
    _released_kernel(img, disp, out, holes)
    return torch.from_numpy(out).reshape(*lead, C, H, W).to(image.dtype), torch.from_numpy(holes).reshape(*lead, H, W)


# data.splat: how the pipeline warps the left view from its disparity (the two agree on integer shifts
# without collisions; they differ where pixels collide: depth test vs scan order).
SPLATS = {"nearest": forward_splat, "released": released_splat}


def close_mask(mask: torch.Tensor, kernel_size: int = 11) -> torch.Tensor:
    """Morphological closing (dilate, then erode) of a bool mask `[..., H, W]` with a square kernel.

    The paper closes the disocclusion mask with an 11x11 kernel at train and test time (App. C.1),
    which merges speckle holes into solid regions. kernel_size 1 (or 0) returns the mask unchanged.
    """
    if kernel_size < 0 or (kernel_size > 1 and kernel_size % 2 == 0):
        raise GeometryError(f"closing kernel_size must be odd (or 0/1 for none), got {kernel_size}")
    if kernel_size <= 1:
        return mask.bool()
    lead, (H, W) = mask.shape[:-2], mask.shape[-2:]
    m = mask.reshape(-1, 1, H, W).float()
    closed = 1 - _max_filter(1 - _max_filter(m, kernel_size), kernel_size)  # erosion = 1 - dilation of 1 - x
    return closed.reshape(*lead, H, W) > 0.5


def _max_filter(x: torch.Tensor, k: int) -> torch.Tensor:
    """Square max filter [N, 1, H, W] as a row pass then a column pass (same result, O(k) not O(k^2)).
    max_pool pads with -inf, so the border never adds or removes mask."""
    x = F.max_pool2d(x, (1, k), stride=1, padding=(0, k // 2))
    return F.max_pool2d(x, (k, 1), stride=1, padding=(k // 2, 0))


def dilate_mask(mask: torch.Tensor, kernel_size: int = 3) -> torch.Tensor:
    """Dilation of a bool mask `[..., H, W]` with a square kernel (the released code adds 3x3)."""
    if kernel_size <= 1:
        return mask.bool()
    lead, (H, W) = mask.shape[:-2], mask.shape[-2:]
    return _max_filter(mask.reshape(-1, 1, H, W).float(), kernel_size).reshape(*lead, H, W) > 0.5


def mask_to_latent(mask: torch.Tensor, size: tuple[int, int], mode: str = "bilinear") -> torch.Tensor:
    """Resize a hole mask `[..., H, W]` to a latent grid `size` = (h, w) as float in [0, 1].

    mode "bilinear" (the released code: bilinear, no antialias; the fraction of hole area under a latent
    cell, approximately), "area" (exact hole fraction per cell), or "max" (any hole pixel marks the cell).
    """
    lead, (H, W) = mask.shape[:-2], mask.shape[-2:]
    m = mask.reshape(-1, 1, H, W).float()
    if mode == "bilinear":
        out = F.interpolate(m, size=size, mode="bilinear", align_corners=False, antialias=False)
    elif mode == "area":
        out = F.adaptive_avg_pool2d(m, size)
    elif mode == "max":
        out = F.adaptive_max_pool2d(m, size)
    else:
        raise GeometryError(f"unknown mask resize mode {mode!r}; choose bilinear, area or max")
    return out.reshape(*lead, *size)
