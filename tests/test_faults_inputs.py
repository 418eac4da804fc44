"""Unclear errors and leftovers, with real processes, signals and files: a video whose first frame is
corrupt, NaN depth in one frame, M2S_ROOT naming no folder, `m2s evaluate` on a folder, the partial file of
a convert killed with -9, the temporary folder of a benchmark stopped by SIGTERM, `--quick` figures."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from lightning_m2s.data.video_io import video_info, write_video
from lightning_m2s.errors import DataError, GeometryError

M2S = [sys.executable, "-m", "lightning_m2s.cli"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def m2s(args, cwd: Path, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(M2S + args, env={**ENV, "M2S_ROOT": str(cwd), **(env or {})}, capture_output=True,
                          text=True, cwd=cwd, timeout=timeout)


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return proc.stderr.strip().splitlines()[-1]


def video(path: Path, frames: int = 10) -> Path:
    return write_video(path, (np.random.default_rng(0).random((frames, 48, 64, 3)) * 255).astype(np.uint8), 10.0)


def test_a_video_whose_first_frame_is_corrupt_is_one_line_naming_it(tmp_path):
    bad = video(tmp_path / "bad.mp4")
    data = bytearray(bad.read_bytes())
    start = data.index(b"mdat") + 12
    data[start : start + 3000] = b"\xff" * 3000  # the first (key) frame's slice data
    bad.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"cannot decode frame 0 of video .*bad\.mp4: the file is corrupt"):
        video_info(bad)
    np.save(tmp_path / "depth.npy", np.ones((10, 48, 64), np.float32))
    proc = m2s(["convert", str(bad), "--checkpoint", str(tmp_path / "none.ckpt"), "--depth",
                str(tmp_path / "depth.npy"), "--out", str(tmp_path / "out.mp4")], tmp_path)
    assert "cannot decode frame 0 of video" in one_line_error(proc)


def test_nan_depth_names_only_the_bad_frames(tmp_path):
    from lightning_m2s.depth import open_depth_file

    depth = np.ones((40, 8, 8), np.float32)
    depth[5, 2, 3] = np.nan
    depth[30:33] = -1.0
    np.save(tmp_path / "d.npy", depth)
    source = open_depth_file(tmp_path / "d.npy", kind="depth")
    with pytest.raises(GeometryError, match=r"1 non-finite values \(NaN or inf\) in frame 5$"):
        source.inverse(0, 40)
    depth[5, 2, 3] = 1.0
    np.save(tmp_path / "d.npy", depth)
    with pytest.raises(GeometryError, match=r"values <= 0 in frames 30-32;"):
        open_depth_file(tmp_path / "d.npy", kind="depth").inverse(0, 40)


@pytest.mark.slow
def test_m2s_root_naming_a_file_or_no_folder_is_one_line(tmp_path):
    (tmp_path / "a_file").write_text("")
    for root, what in ((tmp_path / "a_file", "is a file, not a folder"), (tmp_path / "typo", "does not exist")):
        last = one_line_error(m2s(["train", "debug"], tmp_path, env={"M2S_ROOT": str(root)}))
        assert f"M2S_ROOT={root} {what}" in last, last
    assert not (tmp_path / "typo").exists() and not (tmp_path / "mlflow.db").exists()  # no store started anywhere


@pytest.mark.slow
def test_evaluate_on_a_folder_that_is_no_checkpoint_says_so(tmp_path):
    (tmp_path / "empty").mkdir()
    last = one_line_error(m2s(["evaluate", str(tmp_path / "empty"), "--experiment", "debug", "--no-floors"], tmp_path))
    assert f"{tmp_path / 'empty'} is not" in last and "DeepSpeed" not in last, last  # nor a model directory
    deepspeed = tmp_path / "epoch=0.ckpt"
    (deepspeed / "checkpoint").mkdir(parents=True)
    (deepspeed / "latest").write_text("checkpoint")
    last = one_line_error(m2s(["evaluate", str(deepspeed), "--experiment", "debug", "--no-floors"], tmp_path))
    assert "is a DeepSpeed folder" in last, last


WRITER = """
import sys, time, numpy as np
from lightning_m2s.convert import StreamWriter
writer = StreamWriter(sys.argv[1], fps=10.0)
writer.write(np.zeros((4, 48, 64, 3), np.uint8))
print("writing", flush=True)
time.sleep(600)
"""


@pytest.mark.slow
def test_the_partial_file_of_a_convert_killed_with_9_is_removed_by_the_next_one_but_not_a_live_ones(tmp_path):
    src = video(tmp_path / "in.mp4")
    np.save(tmp_path / "depth.npy", np.ones((10, 48, 64), np.float32))
    writers = {}
    for name in ("killed", "live"):
        writers[name] = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path / "out.mp4")], env=ENV,
                                         stdout=subprocess.PIPE, text=True)
        assert writers[name].stdout.readline().strip() == "writing"
    try:
        partials = set(tmp_path.glob(".out.*.partial.mp4"))
        assert len(partials) == 2
        writers["killed"].send_signal(signal.SIGKILL)  # no clean-up at all
        writers["killed"].wait(30)
        # the next convert to that output (here it stops at the missing checkpoint, after the clean-up)
        proc = m2s(["convert", str(src), "--checkpoint", str(tmp_path / "none.ckpt"), "--depth",
                    str(tmp_path / "depth.npy"), "--out", str(tmp_path / "out.mp4")], tmp_path)
        assert "none.ckpt" in one_line_error(proc)
        left = set(tmp_path.glob(".out.*.partial.mp4"))
        assert len(left) == 1 and left < partials  # the live writer's file stays
    finally:
        for proc in writers.values():
            proc.kill()
            proc.wait()


@pytest.mark.slow
def test_sigterm_to_a_benchmark_removes_its_temporary_folder(tmp_path):
    tmpdir = tmp_path / "tmpdir"
    tmpdir.mkdir()
    log = open(tmp_path / "log.txt", "w")
    proc = subprocess.Popen(M2S + ["bench", "convert", "--quick"], env={**ENV, "M2S_ROOT": str(tmp_path), "TMPDIR": str(tmpdir)},
                            cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while not list(tmpdir.glob("m2s-bench-convert-*/*")):
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "log.txt").read_text()[-2000:]
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(120) == 143, (tmp_path / "log.txt").read_text()[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not list(tmpdir.glob("m2s-bench-convert-*"))


def test_quick_benchmark_figures_never_replace_the_recorded_ones(tmp_path, monkeypatch):
    import types

    from lightning_m2s import bench

    fake = types.ModuleType("lightning_m2s.benchmarks.fake")
    fake.run = lambda quick: {"figure": 1.0 if quick else 2.0}
    monkeypatch.setitem(sys.modules, fake.__name__, fake)
    monkeypatch.setitem(bench.BENCHMARKS, "fake", "fake")
    assert bench.run_benchmark("fake", quick=True, out_dir=tmp_path)["figure"] == 1.0
    assert not list(tmp_path.iterdir())
    bench.run_benchmark("fake", out_dir=tmp_path)
    assert '"figure": 2.0' in (tmp_path / "fake.json").read_text()


def test_one_test_clip_gives_no_interval_and_no_star():
    from lightning_m2s.comparison import _interval
    from lightning_m2s.stats import paired_difference

    d = paired_difference(np.array([[30.0]]), np.array([[20.0]]))
    assert d.mean == 10.0 and d.lo != d.lo and d.hi != d.hi and not d.excludes_zero
    assert "*" not in _interval({"metric": "psnr", "mean": d.mean, "lo": d.lo, "hi": d.hi,
                                         "excludes_zero": d.excludes_zero})
    assert paired_difference(np.array([[30.0, 31.0]]), np.array([[20.0, 20.5]])).excludes_zero  # two clips: an interval
