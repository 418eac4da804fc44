"""Sweep workers: several `m2s sweep` processes on one study, on this machine or as SLURM jobs.

Every worker runs the same sweep command on the same study storage; the study hands each worker a grid
point of its own (sweep.run_sweep), so the workers need no coordination besides the storage.

- local (`--workers N --devices-per-trial K`): N processes; worker i sees accelerators [i*K, (i+1)*K) of
  the node's (the CUDA_VISIBLE_DEVICES a scheduler set, else every GPU) through CUDA_VISIBLE_DEVICES, and
  1/N of the CPU threads. On a machine without GPUs only the threads are split.
- slurm (`--launcher slurm`): N jobs of one array through submitit, each one task with K GPUs. SLURM (or
  submitit's local executor, the same code path) sends the preemption / time-limit signal (USR2): the
  worker stops its trial as on SIGTERM (last.ckpt, the trial failed in the study), and submitit requeues
  the job; the requeued worker retries the trial, which resumes from last.ckpt into the same MLflow run.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from lightning_m2s.errors import ConfigError, Interrupted, M2SError

log = logging.getLogger(__name__)
M2S = [sys.executable, "-m", "lightning_m2s.cli"]
PREEMPT_SIGNAL = signal.SIGUSR2  # submitit's (and its sbatch --signal) preemption / time-limit signal


def worker_command(ablation: str, overrides: list[str], experiment: str | None, trials: int | None,
                   storage: str | None, tracking_uri: str | None, devices_per_trial: int,
                   trials_only: bool = False) -> list[str]:
    """The `m2s sweep` command line every worker runs: one worker, the launcher's options."""
    cmd = M2S + ["sweep", ablation, *overrides, "--devices-per-trial", str(devices_per_trial)]
    cmd += ["--trials-only"] if trials_only else []
    for flag, value in (("--experiment", experiment), ("--trials", trials), ("--storage", storage),
                        ("--tracking-uri", tracking_uri)):
        if value is not None:
            cmd += [flag, str(value)]
    return cmd


def node_devices() -> list[str]:
    """This node's accelerators: what CUDA_VISIBLE_DEVICES lists (a scheduler's allocation), else every GPU."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [d.strip() for d in visible.split(",") if d.strip()]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


def worker_envs(workers: int, devices_per_trial: int, devices: list[str], cpus: int) -> list[dict[str, str]]:
    """Each worker's environment: its own `devices_per_trial` accelerators, and its share of the CPU threads."""
    if workers < 1 or devices_per_trial < 1:
        raise ConfigError(f"--workers {workers} and --devices-per-trial {devices_per_trial} must be at least 1")
    if devices and workers * devices_per_trial > len(devices):
        raise ConfigError(f"--workers {workers} x --devices-per-trial {devices_per_trial} needs "
                          f"{workers * devices_per_trial} accelerators; this node has {len(devices)} ({','.join(devices)})")
    threads = str(max(1, cpus // workers))
    envs = []
    for i in range(workers):
        env = {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}  # torch's intra-op threads
        if devices:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(devices[i * devices_per_trial:(i + 1) * devices_per_trial])
        envs.append(env)
    return envs


def run_local(command: list[str], workers: int, devices_per_trial: int, log_dir: Path,
              while_waiting=None) -> list[int]:
    """Run `workers` copies of `command`, each pinned by worker_envs, until all end (calling `while_waiting()`
    once they started); returns their exit codes. SIGTERM to the launcher goes to every worker (each stops
    its trial with last.ckpt); Ctrl-C reaches them through the terminal's process group."""
    envs = worker_envs(workers, devices_per_trial, node_devices(), len(os.sched_getaffinity(0)))
    log_dir.mkdir(parents=True, exist_ok=True)
    procs = []
    stopped = []

    def forward(signum, frame):
        stopped.append(signum)
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    previous = signal.signal(signal.SIGTERM, forward)
    try:
        for i, env in enumerate(envs):
            with open(log_dir / f"worker{i}.log", "w") as out:
                procs.append(subprocess.Popen(command, env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT))
            log.info("worker %d (pid %d, %s): %s", i, procs[-1].pid, env, log_dir / f"worker{i}.log")
        if while_waiting is not None:
            try:
                while_waiting()
            except SystemExit:  # Lightning's stop on the SIGTERM forwarded above (while_waiting runs a Trainer)
                if not stopped:
                    raise
        while any(p.poll() is None for p in procs):
            time.sleep(0.5)
    finally:
        for p in procs:  # the launcher is leaving (an error, Ctrl-C): so are its workers
            if p.poll() is None:
                p.terminate()
        for p in procs:
            p.wait()
        signal.signal(signal.SIGTERM, previous)
    if stopped:
        raise Interrupted(stopped[0], None)
    return [p.returncode for p in procs]


class SweepJob:
    """One sweep worker as a submitit job: runs the worker command; on the preemption / time-limit signal
    it lets the worker stop its trial, then asks submitit to requeue the job (`checkpoint`)."""

    def __init__(self, command: list[str]):
        self.command = command
        self._proc: subprocess.Popen | None = None

    def __call__(self) -> int:
        env = dict(os.environ)
        # One task per job: Lightning starts the trial's ranks itself, as on a multi-GPU node, instead of
        # expecting srun to have started one task per device (it looks for SLURM_NTASKS).
        env.pop("SLURM_NTASKS", None)
        self._proc = subprocess.Popen(self.command, env=env)
        code = self._proc.wait()
        if code != 0:
            raise RuntimeError(f"sweep worker exited with code {code}: {' '.join(self.command)}")
        return code

    def checkpoint(self, *args, **kwargs):
        """Called by submitit on the preemption / time-limit signal, before it requeues the job."""
        from submitit.helpers import DelayedSubmission

        if self._proc is not None and self._proc.returncode is None:
            self._proc.send_signal(PREEMPT_SIGNAL)  # the worker stops its trial as on SIGTERM (cli._sweep)
            _wait_pid(self._proc.pid, timeout=120)
        return DelayedSubmission(SweepJob(self.command))

    def __getstate__(self):  # submitit pickles the job; a running process is not part of it
        return {"command": self.command, "_proc": None}


def _wait_pid(pid: int, timeout: float) -> None:
    """Wait for a child to end, then SIGKILL it (its trial is retried once its heartbeat is stale). Plain
    waitpid: this runs in a signal handler, possibly while Popen.wait holds its lock."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if os.waitpid(pid, os.WNOHANG)[0]:
                return
        except ChildProcessError:  # already reaped
            return
        time.sleep(0.5)
    os.kill(pid, signal.SIGKILL)


def slurm_settings(spec, workers: int | None, devices_per_trial: int | None, partition: str | None,
                   time_min: int | None) -> dict:
    """submit_slurm's settings: each flag given, else the sweep file's `slurm:` section, else a default
    (one job per grid point, or per trial of a search; one GPU; 4 hours)."""
    file = spec.slurm
    return {"workers": workers or file.get("workers") or (spec.grid_size if spec.sampler == "grid" else spec.trials or 1),
            "devices_per_trial": devices_per_trial or file.get("devices_per_trial", 1),
            "partition": partition or file.get("partition"),
            "time_min": time_min or file.get("time_min", 240),
            "additional": file.get("additional")}


def submit_slurm(command: list[str], workers: int, devices_per_trial: int, folder: Path, partition: str | None,
                 time_min: int, name: str, additional: dict | None = None, cluster: str = "slurm") -> list:
    """Submit `workers` SweepJobs as one job array (cluster="local": submitit's local executor, for tests);
    returns submitit's jobs."""
    import submitit

    if workers < 1 or devices_per_trial < 1 or time_min < 1:
        raise ConfigError(f"--workers {workers}, --devices-per-trial {devices_per_trial} and --time-min {time_min} "
                          "must be at least 1")
    if cluster == "slurm" and not partition:
        raise ConfigError("--launcher slurm needs a partition: --partition NAME or `slurm: {partition: NAME}` in the sweep file")
    if cluster == "slurm" and not shutil.which("sbatch"):
        raise M2SError("--launcher slurm: no SLURM here (sbatch not found); run it where jobs are submitted")
    executor = submitit.AutoExecutor(folder=folder, cluster=cluster)
    executor.update_parameters(name=name, timeout_min=time_min, nodes=1, tasks_per_node=1,
                               gpus_per_node=devices_per_trial, slurm_additional_parameters=additional or {},
                               **({"slurm_partition": partition} if partition else {}))
    with executor.batch():  # one array on SLURM
        jobs = [executor.submit(SweepJob(command)) for _ in range(workers)]
    return jobs
