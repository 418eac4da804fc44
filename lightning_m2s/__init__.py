"""lightning_m2s: monocular-to-stereo video conversion research (M2SVid) on PyTorch Lightning."""

__version__ = "0.1.0"
