"""Stereo clip data: sources -> temporal sampling -> crop/resize -> warp -> StereoClip batches."""

from lightning_m2s.data.buckets import Bucket, BucketBatchSampler, SampleKey, parse_buckets
from lightning_m2s.data.clip import StereoClip, collate_clips, make_clip
from lightning_m2s.data.datamodule import StereoDataModule
from lightning_m2s.data.dataset import StereoClipDataset, build_sources
from lightning_m2s.data.sources import SOURCES, build_source

__all__ = [
    "Bucket", "BucketBatchSampler", "SampleKey", "parse_buckets", "StereoClip", "collate_clips", "make_clip",
    "StereoDataModule", "StereoClipDataset", "build_sources", "SOURCES", "build_source",
]
