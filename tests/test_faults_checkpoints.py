"""Checkpoint faults with real processes, signals and file systems: a save killed with -9, a small $TMPDIR,
a full output disk. Checkpoints are written beside their final place and renamed; nothing is staged in
$TMPDIR. The tests that need a small file system mount a tmpfs (root only; they skip otherwise)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import torch

from lightning_m2s.checkpoints import remove_temporaries

M2S = [sys.executable, "-m", "lightning_m2s.cli"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
SAVER = """
import sys, time, torch
from lightning_m2s.checkpoints import AtomicCheckpointIO
io, big = AtomicCheckpointIO(), {"w": torch.ones(8_000_000)}  # 32 MB
while True:
    io.save_checkpoint(big, sys.argv[1])
"""


@pytest.fixture
def small_disk(tmp_path):
    """small_disk(name, size): a tmpfs of `size` (e.g. "4m") mounted at tmp_path/name."""
    mounted = []

    def mount(name: str, size: str) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a small tmpfs here (needs root): {done.stderr.decode().strip()}")
        mounted.append(folder)
        return folder

    yield mount
    for folder in mounted:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def files_in(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()]


def test_a_save_killed_with_9_leaves_nothing_in_tmpdir_and_the_next_start_removes_its_temporary(tmp_path):
    tmpdir, folder = tmp_path / "tmpdir", tmp_path / "checkpoints"
    tmpdir.mkdir()
    target = folder / "last.ckpt"
    proc = subprocess.Popen([sys.executable, "-c", SAVER, str(target)], env={**ENV, "TMPDIR": str(tmpdir)})
    try:
        deadline = time.monotonic() + 120
        while not any(p.stat().st_size > 1_000_000 for p in folder.glob(".last.ckpt.*.tmp") if p.exists()):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.01)
        assert not files_in(tmpdir)  # the checkpoint is written beside its final place, not staged in $TMPDIR
        proc.send_signal(signal.SIGKILL)  # mid-write: no clean-up at all
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not files_in(tmpdir)
    assert list(folder.glob(".last.ckpt.*.tmp"))  # what the killed save leaves ...
    if target.exists():  # ... never a torn last.ckpt: an earlier complete one, or none
        assert torch.load(target, weights_only=True)["w"].shape == (8_000_000,)
    remove_temporaries(folder)  # ... and what train() clears when it starts
    assert not list(folder.glob(".*.tmp"))


def test_a_full_output_disk_is_one_line_naming_the_checkpoint_and_the_leftover_temporary_is_removed(tmp_path, small_disk):
    out = small_disk("out", "6m")  # room for the config and run id, not for a checkpoint (~40 MB)
    leftover = out / "checkpoints" / ".last.ckpt.k1ll3d.tmp"
    leftover.parent.mkdir()
    leftover.write_bytes(b"\0" * 1000)  # from a save killed mid-write
    db = tmp_path / "mlflow.db"
    proc = subprocess.run(M2S + ["train", "debug", "checkpoint.every_n_steps=1", f"meta.output_dir={out}",
                                 f"tracking.uri=sqlite:///{db}"], env={**ENV, "M2S_ROOT": str(tmp_path)},
                          capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert f"cannot write checkpoint {out / 'checkpoints'}" in last and "no space left on device" in last, last
    assert not list((out / "checkpoints").glob(".*")) and not list((out / "checkpoints").glob("*.ckpt"))
    client = mlflow.MlflowClient(f"sqlite:///{db}")
    (run,) = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    assert run.info.status == "FAILED"


@pytest.mark.slow
def test_a_small_tmpdir_does_not_break_the_saves(tmp_path, small_disk):
    tmpdir = small_disk("tmpdir", "1m")
    out = tmp_path / "out"
    proc = subprocess.run(M2S + ["train", "debug", "checkpoint.every_n_steps=1", f"meta.output_dir={out}",
                                 f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"],
                          env={**ENV, "M2S_ROOT": str(tmp_path), "TMPDIR": str(tmpdir)}, capture_output=True, text=True,
                          cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2
