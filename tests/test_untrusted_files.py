"""Files given to the project never run code: crafted checkpoints and Stereo4D pickles that would create
a file if their payload ran."""

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_stereo4d_clip

from lightning_m2s.config import load_config
from lightning_m2s.data.sources.stereo4d import Stereo4DSource
from lightning_m2s.errors import DataError, ModelError
from lightning_m2s.modules import read_checkpoint
from lightning_m2s.safe_pickle import load_data_pickle
from lightning_m2s.train import train


class Payload:
    """Unpickling this runs `touch target` (os.system): the file appearing proves that code ran."""

    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


def crafted_checkpoint(path: Path, target: Path) -> Path:
    torch.save({"state_dict": {}, "hyper_parameters": {"model": {}}, "payload": Payload(target)}, path)
    return path


def test_a_crafted_checkpoint_never_runs_and_names_the_file(tmp_path):
    target = tmp_path / "pwned"
    ckpt = crafted_checkpoint(tmp_path / "evil.ckpt", target)
    with pytest.raises(ModelError, match=r"evil\.ckpt cannot be read as a weights-only checkpoint"):
        read_checkpoint(str(ckpt))
    assert not target.exists()


def test_init_from_a_crafted_checkpoint_never_runs(tmp_path):
    from conftest import store_overrides

    target = tmp_path / "pwned"
    ckpt = crafted_checkpoint(tmp_path / "evil.ckpt", target)
    cfg = load_config("debug", [f"checkpoint.init_from={ckpt}", *store_overrides(tmp_path)])
    with pytest.raises(ModelError, match="evil.ckpt"):
        train(cfg)
    assert not target.exists()


def test_convert_refuses_a_crafted_checkpoint(tmp_path):
    import subprocess
    import sys

    from lightning_m2s.data.video_io import write_video

    target = tmp_path / "pwned"
    ckpt = crafted_checkpoint(tmp_path / "evil.ckpt", target)
    video = tmp_path / "in.mp4"
    write_video(video, np.zeros((4, 32, 32, 3), np.uint8), 10.0)
    np.save(tmp_path / "depth.npy", np.ones((4, 32, 32), np.float32))
    proc = subprocess.run([sys.executable, "-m", "lightning_m2s.cli", "convert", str(video), "--checkpoint", str(ckpt),
                           "--out", str(tmp_path / "out.mp4"), "--depth", str(tmp_path / "depth.npy")],
                          capture_output=True, text=True)
    assert proc.returncode != 0 and "evil.ckpt" in proc.stderr
    assert not target.exists()


def test_a_crafted_stereo4d_pickle_never_runs_and_names_the_file(tmp_path, stereo_arrays):
    left, right, disparity = stereo_arrays
    write_stereo4d_clip(tmp_path, "clip", left, right, disparity)
    flows = tmp_path / "clip" / "clip-flows_stereo.pkl"
    real = load_data_pickle(flows)  # the real format: a list of dicts of numpy arrays loads
    assert isinstance(real[0]["fwd"], np.ndarray) and real[0]["fwd"].shape[-1] == 2
    target = tmp_path / "pwned"
    with open(flows, "wb") as f:
        pickle.dump([{"fwd": Payload(target)}] * len(real), f)
    source = Stereo4DSource(root=tmp_path)
    with pytest.raises(DataError, match=r"clip-flows_stereo\.pkl: refused to load: the pickle names (posix|os)\.system"):
        source.read(0, np.arange(4))
    assert not target.exists()
