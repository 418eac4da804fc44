"""StereoDataModule end to end: batches, the sample contract, device moves, determinism, worker independence."""

from __future__ import annotations

import torch

from lightning_m2s.data import StereoClip, StereoDataModule, collate_clips

TINY = dict(
    train_sources=[{"name": "synthetic", "num_videos": 6, "size": [64, 64], "error_blur": 1.0},
                   {"name": "image_pairs", "num_clips": 2, "size": 64, "weight": 0.5}],
    val_sources=[{"name": "synthetic", "num_videos": 2, "size": [64, 64], "seed": 99},
                 {"name": "image_pairs", "num_clips": 2, "size": 64}],
    buckets=["2x32", {"frames": 3, "size": 16, "batch_size": 3}],
    batch_size=2, train_batches=4, eval_frames=4, eval_size=32, close_kernel=5, num_workers=0,
)


def check_clip(b: StereoClip, B: int, T: int, S: int):
    assert b.left.shape == b.right.shape == b.warped.shape == (B, T, 3, S, S)
    assert b.disparity.shape == b.holes.shape == b.mask.shape == (B, T, 1, S, S)
    assert b.holes.dtype == b.mask.dtype == torch.bool
    for x in (b.left, b.right, b.warped):
        assert x.min() >= -1 and x.max() <= 1
    assert torch.isfinite(b.disparity).all() and b.disparity.min() >= 0
    assert (b.mask | ~b.holes).all()  # closing only grows the holes
    assert (b.warped.masked_select(b.mask) == -1).all()  # black under M
    assert isinstance(b.meta, list) and len(b.meta) == B and {"source", "video", "fps", "frame_indices"} <= set(b.meta[0])


def test_train_batches_follow_buckets():
    dm = StereoDataModule(**TINY)
    dm.setup("fit")
    batches = list(dm.train_dataloader())
    assert len(batches) == 4
    for b in batches:
        T = b.left.shape[1]
        check_clip(b, 2 if T == 2 else 3, T, 32 if T == 2 else 16)
        for m in b.meta:
            assert 5 <= m["fps"] <= 30 and len(m["frame_indices"]) == T


def test_val_is_fixed_centre_crops_of_all_sources():
    dm = StereoDataModule(**TINY)
    a, b = list(dm.val_dataloader()), list(dm.val_dataloader())
    assert [x.meta[0]["source"] for x in a] == ["synthetic", "image_pairs", "synthetic", "image_pairs"]
    for x, y in zip(a, b):
        check_clip(x, 1, 4, 32)
        assert torch.equal(x.warped, y.warped)
        assert x.meta[0]["start_frame"] == 0 and x.meta[0]["fps"] == 5.0
    assert len(StereoDataModule(**{**TINY, "val_clips": 3}).val_dataloader()) == 3


def test_ddp_evaluation_scores_every_clip_once():
    """3 validation clips over 2 ranks: both ranks run 2 steps; rank 1's second clip is a marked filler."""
    from types import SimpleNamespace

    seen = []
    for rank in (0, 1):
        dm = StereoDataModule(**{**TINY, "val_clips": 3})
        dm.trainer = SimpleNamespace(world_size=2, global_rank=rank)
        batches = list(dm.val_dataloader())
        assert len(batches) == 2
        seen += [(b.meta[0]["source"], b.meta[0]["index"], bool(b.meta[0].get("padding"))) for b in batches]
    scored = [s[:2] for s in seen if not s[2]]
    assert len(scored) == 3 and len(set(scored)) == 3 and sum(s[2] for s in seen) == 1


def test_move_data_to_device_keeps_the_clip():
    from lightning.fabric.utilities.apply_func import move_data_to_device

    dm = StereoDataModule(**TINY)
    batch = next(iter(dm.val_dataloader()))
    moved = move_data_to_device(batch, torch.device("meta"))
    assert isinstance(moved, StereoClip) and moved.left.device.type == "meta" and moved.mask.dtype == torch.bool
    assert moved.meta == batch.meta
    stacked = collate_clips([dm.dataset("val")[0], dm.dataset("val")[2]])
    assert stacked.left.shape[0] == 2 and len(stacked.meta) == 2


def test_samples_do_not_depend_on_worker_count():
    ref = list(StereoDataModule(**{**TINY, "train_batches": 2}).train_dataloader())
    workers = list(StereoDataModule(**{**TINY, "train_batches": 2, "num_workers": 2}).train_dataloader())
    for x, y in zip(ref, workers):
        assert torch.equal(x.left, y.left) and torch.equal(x.warped, y.warped) and x.meta == y.meta


def test_data_splat_chooses_the_warp_of_the_pipeline():
    """data.splat: released warps every clip with the release's scatter_image instead of the depth-tested splat."""
    import pytest

    from lightning_m2s.data.clip import make_clip
    from lightning_m2s.errors import ConfigError

    clips = {mode: StereoDataModule(**TINY, splat=mode).dataset("val")[0] for mode in ("nearest", "released")}
    released, nearest = clips["released"], clips["nearest"]
    assert torch.equal(released.left, nearest.left) and torch.equal(released.disparity, nearest.disparity)
    again = make_clip(released.left, released.right, released.disparity[:, 0], close_kernel=5, splat="released")
    assert torch.equal(again.warped, released.warped) and torch.equal(again.holes, released.holes)
    assert not torch.equal(released.warped, nearest.warped)  # occlusions of the layered scene: another warp
    with pytest.raises(ConfigError, match="data.splat"):
        StereoDataModule(**TINY, splat="bilinear")
