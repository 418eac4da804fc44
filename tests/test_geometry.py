import math

import numpy as np
import pytest
import torch
from skimage import data

from lightning_m2s.errors import GeometryError, M2SError
from lightning_m2s.geometry import (
    _released_torch,
    _splat_torch,
    close_mask,
    depth_to_disparity,
    dilate_mask,
    forward_splat,
    mask_to_latent,
    released_splat,
    splat_reference,
)


def test_integer_shift_moves_pixels_left_and_leaves_holes_at_the_right_edge():
    image = torch.arange(2 * 4 * 8, dtype=torch.float32).reshape(2, 4, 8)  # [C, H, W]
    disparity = torch.full((4, 8), 3.0)
    warped, holes = forward_splat(image, disparity)
    # right[x] = left[x + 3]; the last 3 columns see nothing of the left view
    assert torch.equal(warped[..., :5], image[..., 3:])
    assert holes[:, 5:].all() and not holes[:, :5].any()
    assert (warped[..., 5:] == 0).all()


def test_nearest_surface_wins_and_disocclusion_appears_beside_it():
    image = torch.zeros(1, 1, 20)
    image[..., 8:12] = 1.0  # a foreground object
    disparity = torch.full((1, 20), 1.0)
    disparity[..., 8:12] = 5.0  # much nearer
    warped, holes = forward_splat(image, disparity)
    # the object lands at columns 3-6 and covers the background that also lands there
    assert torch.equal(warped[0, 0, 3:7], torch.ones(4))
    # background from left columns 8-11 is hidden by the object: right columns 7-10 (x - 1) see nothing
    assert holes[0, 7:11].all()
    assert not holes[0, :7].any() and not holes[0, 11:19].any()


def test_subpixel_shift_interpolates_linearly():
    image = torch.tensor([[[0.0, 10.0, 20.0, 30.0, 40.0]]])
    warped, holes = forward_splat(image, torch.full((1, 5), 0.5))
    # right pixel x receives left x (weight .5, from x + .5 - .5) and left x + 1 (weight .5)
    assert torch.allclose(warped[0, 0, :4], torch.tensor([5.0, 15.0, 25.0, 35.0]))
    assert not holes[0, :4].any() and not holes[0, 4]  # the last pixel still gets half of left x=4


@pytest.mark.parametrize("shape", [(3, 17, 23), (2, 3, 9, 31)])
def test_compiled_torch_and_reference_splats_agree(shape):
    g = torch.Generator().manual_seed(0)
    image = torch.rand(shape, generator=g)
    disparity = torch.rand(shape[:-3] + shape[-2:], generator=g) * 6
    disparity[..., 4:9, 5:12] += 4  # an occluding block so the depth test matters
    warped, holes = forward_splat(image, disparity)
    warped_t, holes_t = _splat_torch(image, disparity)
    assert torch.equal(holes, holes_t)
    assert torch.allclose(warped, warped_t, atol=1e-5)
    flat_img, flat_disp = image.reshape(-1, *shape[-3:]), disparity.reshape(-1, *shape[-2:])
    for i in range(flat_img.shape[0]):
        ref, ref_holes = splat_reference(flat_img[i].numpy(), flat_disp[i].numpy())
        assert np.array_equal(ref_holes, holes.reshape(-1, *shape[-2:])[i].numpy())
        assert np.allclose(ref, warped.reshape(-1, *shape[-3:])[i].numpy(), atol=1e-5)


def test_splat_is_deterministic_and_differentiable_on_the_torch_path():
    g = torch.Generator().manual_seed(1)
    image = torch.rand(3, 16, 16, generator=g, requires_grad=True)
    disparity = torch.rand(16, 16, generator=g) * 4
    a, _ = forward_splat(image, disparity)
    b, _ = forward_splat(image, disparity)
    assert torch.equal(a, b)
    a.sum().backward()
    assert image.grad is not None and image.grad.abs().sum() > 0


def test_middlebury_pair_warps_onto_its_right_view():
    left, right, disparity = data.stereo_motorcycle()
    known = np.isfinite(disparity)
    disparity = np.where(known, disparity, 0.0).astype(np.float32)
    image = torch.from_numpy(left).permute(2, 0, 1).float()
    warped, holes = forward_splat(image, torch.from_numpy(disparity))
    target = torch.from_numpy(right).permute(2, 0, 1).float()
    # Compare where a left pixel of known disparity landed and the right view has content.
    valid = ~holes & torch.from_numpy(known)
    err = (warped - target).abs().mean(0)[valid].mean().item()
    unwarped = (image - target).abs().mean(0)[valid].mean().item()
    # The pair is real (exposure differences between the cameras, specular highlights, occluded pixels
    # whose disparity is from the left view), so the residual is not zero: about 5/255 measured.
    # A 2x margin (10) still fails any wrong convention, which leaves the unwarped error (~37) or worse.
    assert err < 10.0, err
    assert unwarped > 3 * err
    # Disocclusions exist but are a minority of the frame.
    assert 0.01 < holes.float().mean().item() < 0.3


def released_reference(image: np.ndarray, disparity: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The release's scatter_image, pixel by pixel: image [C, H, W], disparity [H, W]. Each pixel writes
    w * colour and w to its two columns, x - floor(d) (w = 1 - frac) and x - floor(d) - 1 (w = frac); in each
    of the two a later write replaces an earlier one; the two add up and are normalised."""
    C, H, W = image.shape
    colour = [np.zeros((C, H, W)), np.zeros((C, H, W))]
    weight = [np.zeros((H, W)), np.zeros((H, W))]
    for y in range(H):
        for x in range(W):
            d = float(disparity[y, x])
            whole = math.floor(d)
            for k, (col, w) in enumerate(((x - whole, 1.0 - (d - whole)), (x - whole - 1, d - whole))):
                if 0 <= col < W:
                    colour[k][:, y, col] = w * image[:, y, x]
                    weight[k][y, col] = w
    acc, total = colour[0] + colour[1], weight[0] + weight[1]
    holes = total <= 0
    out = np.zeros_like(acc)
    out[:, ~holes] = acc[:, ~holes] / total[~holes]
    return out, holes


def test_released_splat_matches_the_per_pixel_algorithm_on_a_real_frame():
    left, _, disparity = data.stereo_motorcycle()  # a real photograph with its real (sub-pixel) disparity
    rows = slice(180, 220)  # a strip of full-width rows keeps the Python loop to about a second
    image = torch.from_numpy(left[rows]).permute(2, 0, 1).float()
    disp = torch.from_numpy(np.where(np.isfinite(disparity[rows]), disparity[rows], 0.0).astype(np.float32))
    ref, ref_holes = released_reference(image.numpy(), disp.numpy())
    assert 0.01 < ref_holes.mean() < 0.5
    for warped, holes in (released_splat(image, disp), _released_torch(image, disp)):  # compiled and vectorised
        assert np.array_equal(holes.numpy(), ref_holes)
        assert np.abs(warped.numpy() - ref).max() < 1e-3  # of 0..255
    clip = torch.stack([image, image.flip(-1)])  # frames of a clip are independent
    warped, holes = released_splat(clip, torch.stack([disp, disp]))
    ref1, holes1 = released_reference(clip[1].numpy(), disp.numpy())
    assert np.array_equal(holes[1].numpy(), holes1) and np.abs(warped[1].numpy() - ref1).max() < 1e-3


def test_released_splat_has_no_depth_test_and_a_later_write_wins():
    image = torch.tensor([[[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]]])  # [C, H, W] = [1, 1, 6]
    disparity = torch.tensor([[0.0, 0.0, 0.5, 2.25, 0.0, 0.0]])
    warped, holes = released_splat(image, disparity)
    # column 1: x=1 (d 0) is replaced by the later x=3 (weight .75); x=2's other tap (weight .5, d 0.5, far
    # behind x=3) still adds: (.75 * 4 + .5 * 3) / 1.25. Column 3: only x=4's zero-weight tap: a hole.
    assert torch.allclose(warped[0, 0], torch.tensor([1.6, 3.6, 3.0, 0.0, 5.0, 6.0]))
    assert holes[0].tolist() == [False, False, False, True, False, False]
    nearest, _ = forward_splat(image, disparity)
    assert nearest[0, 0, 1] == 4.0  # the depth test keeps the nearest surface alone
    vectorised, _ = _released_torch(image, disparity)
    assert torch.allclose(vectorised, warped)
    grad_image = image.clone().requires_grad_(True)
    released_splat(grad_image, disparity)[0].sum().backward()  # the torch path: differentiable
    assert grad_image.grad.abs().sum() > 0


def test_non_finite_disparity_is_rejected():
    image = torch.rand(3, 4, 4)
    disparity = torch.zeros(4, 4)
    disparity[1, 2] = float("nan")
    with pytest.raises(GeometryError, match="disparity"):
        forward_splat(image, disparity)
    with pytest.raises(GeometryError, match="do not match"):
        forward_splat(image, torch.zeros(4, 5))


def test_depth_to_disparity_normalises_over_the_clip_not_per_frame():
    depth = torch.stack([torch.full((4, 4), 2.0), torch.full((4, 4), 4.0)])
    depth[0, 0, 0] = 1.0  # the nearest point of the clip
    disp = depth_to_disparity(depth, max_disparity=10.0)
    assert disp.max() == pytest.approx(10.0) and disp[0, 0, 0] == pytest.approx(10.0)
    assert disp.min() == pytest.approx(0.0)
    # frame 1 is farther everywhere: per-clip normalisation keeps it smaller than frame 0
    assert disp[1].max() < disp[0].mean()
    shifted = depth_to_disparity(depth, max_disparity=10.0, convergence=0.5)
    assert torch.allclose(shifted, disp - 5.0)
    inverse = depth_to_disparity(1.0 / depth, max_disparity=10.0, inverse=True)
    assert torch.allclose(inverse, disp, atol=1e-5)


@pytest.mark.parametrize(
    "kwargs, depth",
    [
        ({"max_disparity": 0.0}, torch.ones(2, 2)),
        ({"max_disparity": -3.0}, torch.ones(2, 2)),
        ({"max_disparity": 5.0}, torch.tensor([[1.0, float("inf")]])),
        ({"max_disparity": 5.0}, torch.tensor([[1.0, 0.0]])),
        ({"max_disparity": 5.0, "convergence": 2.0}, torch.ones(2, 2)),
    ],
)
def test_bad_depth_parameters_raise_project_errors(kwargs, depth):
    with pytest.raises(M2SError):
        depth_to_disparity(depth, **kwargs)


def test_closing_fills_gaps_between_holes_but_not_far_away():
    mask = torch.zeros(1, 40, 40, dtype=torch.bool)
    mask[0, 10:20, 10] = True
    mask[0, 10:20, 16] = True  # a 5-pixel gap between two hole stripes
    closed = close_mask(mask, 11)
    assert closed[0, 15, 10:17].all()  # the gap is filled
    assert not closed[0, 15, 25:].any() and not closed[0, :5].any()
    assert torch.equal(close_mask(mask, 1), mask)
    assert (close_mask(mask, 11) | mask).equal(close_mask(mask, 11))  # closing never removes holes
    assert dilate_mask(mask, 3).sum() > mask.sum()
    with pytest.raises(GeometryError):
        close_mask(mask, 4)


def test_mask_to_latent_modes():
    mask = torch.zeros(2, 16, 16, dtype=torch.bool)
    mask[:, 0:2, 0:2] = True  # a quarter of the first 4x4 cell
    area = mask_to_latent(mask, (4, 4), "area")
    assert area.shape == (2, 4, 4) and area[0, 0, 0] == pytest.approx(0.25) and area[0, 1:].sum() == 0
    assert mask_to_latent(mask, (4, 4), "max")[0, 0, 0] == 1.0
    bilinear = mask_to_latent(mask, (4, 4), "bilinear")
    assert 0 < bilinear[0, 0, 0] <= 1
    with pytest.raises(GeometryError):
        mask_to_latent(mask, (4, 4), "nearest-ish")
