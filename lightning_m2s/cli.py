"""The `m2s` command: train, sweep, evaluate, convert, bench, dashboard, notebook, pretrain (the shipped weights'
recipes: vae, decoder, prior, export), import-release."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lightning_m2s.cli_models import run_evaluate, run_import_release, run_pretrain
from lightning_m2s.errors import Interrupted, M2SError

# Each grid of sweeps/: the paper's tables it reproduces, what it compares, and its wall time on the embedded
# default (2 CPU cores). left_cond was measured (6 min 42 s on idle cores, 11 min on a loaded day); the others
# are estimates from it, scaled by the arms they train and the step counts they test.
SWEEP_INFO = {
    "left_cond": ("4, 7", "left-view conditioning on vs off, end-to-end, 1 step", 9),
    "left_cond_diffusion": ("4, 7", "left-view conditioning on vs off, standard diffusion, 25 steps", 20),
    "full_attention": ("4, 7", "disocclusion full attention on vs off", 11),
    "loss": ("5, 8", "standard diffusion (25 / 1 steps) vs latent-only vs end-to-end training", 22),
    "baselines": ("6", "warp-only and classical fill vs M2SVid", 4),
    "runtime": ("9", "latency with vs without full attention", 3),
    "inference_steps": ("10", "1 / 5 / 25 inference steps for both training regimes", 30),
    "hparams": ("", "TPE over the learning rate and the Eq. 5 loss weights (8 trials)", 28),
}
CKPT = "outputs/sweeps/left_cond-<id>/with_left-seed0/checkpoints/best.ckpt"  # where a sweep trial's checkpoints are


def _example(*lines: str) -> str:
    return "example:\n" + "\n".join(f"  {line}" for line in lines)


def _sweeps_epilog() -> str:
    rows = [f"  {name:<20} {f'Table {t}: ' if t else ''}{what} (about {minutes} min)"
            for name, (t, what, minutes) in SWEEP_INFO.items()]
    return ("grids in sweeps/ (minutes on the embedded default, 2 CPU cores; left_cond, full_attention and loss "
            "measured, the others estimated):\n" + "\n".join(rows) + "\n\n" + _example(
                "m2s sweep left_cond            # then: m2s dashboard, m2s notebook"))


def _train(args: argparse.Namespace) -> None:
    from lightning_m2s.config import load_config
    from lightning_m2s.train import train

    metrics = train(load_config(args.experiment, args.overrides))
    for key, value in sorted(metrics.items()):
        print(f"{key:<40} {value:.4f}")


def _sweep(args: argparse.Namespace) -> None:
    import logging
    import os
    import signal

    # the project's own progress lines (resuming from a checkpoint, waiting for other workers, ...)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("lightning_m2s").setLevel(logging.INFO)
    launched = args.workers is not None  # N worker processes on this machine run the trials; this one waits
    if launched or args.launcher == "slurm":  # a typo fails here once, not in every worker or job
        from lightning_m2s.sweep import check_sweep_file

        check_sweep_file(args.ablation, args.experiment, args.overrides, args.tracking_uri)
    if args.launcher == "slurm":
        _submit_slurm(args)
        return
    why = _local_workers(args) if launched else []  # for them (started first), then finishes the grid once
    from lightning_m2s.sweep import format_footer, format_table, run_sweep
    from lightning_m2s.tags import ERROR

    # submitit's (SLURM's) preemption / time-limit signal: stop the trial as SIGTERM does, with last.ckpt
    signal.signal(signal.SIGUSR2, lambda signum, frame: os.kill(os.getpid(), signal.SIGTERM))
    summary = run_sweep(args.ablation, experiment=args.experiment, overrides=args.overrides,
                        trials=0 if launched else args.trials, storage=args.storage, tracking_uri=args.tracking_uri,
                        devices_per_trial=args.devices_per_trial, finish=not args.trials_only)
    if summary is None:  # an extra rank process of a multi-device trial
        return
    print(f"\nstudy {summary.study} (objective {summary.objective}, {summary.direction}):")
    print(format_table(summary))
    footer = format_footer(summary)
    if footer:
        print("\n" + footer)
    failed = summary.failed_now
    incomplete = not summary.complete and args.trials is None  # --trials asks for a part of the grid
    if failed or incomplete or why:
        why += [f"{len(failed)} trial(s) failed in this run ({', '.join(t.arm for t in failed)}; see the runs' "
                f"{ERROR} tag)"] if failed else []
        why += ["the grid is incomplete: run the same command again to finish it"] if incomplete else []
        print(f"m2s sweep: {'; '.join(why)}", file=sys.stderr)
        sys.exit(1)


def _worker_command(args: argparse.Namespace, devices_per_trial: int, trials_only: bool) -> list[str]:
    from lightning_m2s.launch import worker_command

    return worker_command(args.ablation, args.overrides, args.experiment, args.trials, args.storage,
                          args.tracking_uri, devices_per_trial, trials_only)


def _local_workers(args: argparse.Namespace) -> list[str]:
    """Run --workers processes pinned to their devices; returns what went wrong in them (for the exit status)."""
    import logging
    import time

    from lightning_m2s.config import work_root
    from lightning_m2s.launch import run_local

    logs = work_root() / "outputs" / "sweeps" / "workers" / f"{Path(args.ablation).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    print(f"m2s sweep: {args.workers} worker(s), logs in {logs}", flush=True)

    def floors():  # the grid's floors, scored here while the workers train (then cached for the table)
        from lightning_m2s.sweep import prepare_floors

        try:
            prepare_floors(args.ablation, args.experiment, args.overrides)
        except Exception as err:  # noqa: BLE001 - the workers go on; the table's run scores them again (and says why not)
            logging.getLogger("lightning_m2s.launch").warning("floors not scored yet: %s", err)
        import lightning_m2s.report, lightning_m2s.train  # noqa: F401, E401 - what the table needs, loaded meanwhile

    codes = run_local(_worker_command(args, args.devices_per_trial or 1, trials_only=True), args.workers,
                      args.devices_per_trial or 1, logs, while_waiting=floors)
    for i, code in enumerate(codes):
        if code < 0:  # killed: what it ran was retried by the others (the table says whether all is done)
            print(f"m2s sweep: worker {i} was killed by signal {-code}", file=sys.stderr)
    return [f"worker {i} exited with code {code} (see {logs / f'worker{i}.log'})" for i, code in enumerate(codes) if code > 0]


def _submit_slurm(args: argparse.Namespace) -> None:
    from lightning_m2s.config import work_root
    from lightning_m2s.launch import slurm_settings, submit_slurm
    from lightning_m2s.sweep import load_sweep

    spec = load_sweep(args.ablation)
    settings = slurm_settings(spec, args.workers, args.devices_per_trial, args.partition, args.time_min)
    folder = work_root() / "outputs" / "slurm" / spec.name / "%j"
    jobs = submit_slurm(_worker_command(args, settings["devices_per_trial"], trials_only=False), folder=folder,
                        name=f"m2s-{spec.name}", **settings)
    print(f"m2s sweep: submitted {len(jobs)} worker job(s) ({', '.join(j.job_id for j in jobs)}), logs in "
          f"{folder.parent}; run `m2s sweep {args.ablation}` with the same options once they end for the table")


def _dashboard(args: argparse.Namespace) -> None:
    from lightning_m2s.dashboard import serve

    serve(args.tracking_uri, args.host, args.port)


def _notebook(args: argparse.Namespace) -> None:
    import signal

    from lightning_m2s.analysis import run_notebook

    signal.signal(signal.SIGTERM, _raise_interrupted)  # unwinds: the kernel is shut down, the temporary copy removed
    print(f"wrote {run_notebook(args.tracking_uri, args.out)}")


def _raise_interrupted(signum, frame):
    raise Interrupted(signum, None)


def _convert(args: argparse.Namespace) -> None:
    import signal

    from lightning_m2s.convert import ConvertOptions, convert

    signal.signal(signal.SIGTERM, _raise_interrupted)  # unwinds the writers: no partial file is left

    options = ConvertOptions(
        format=args.format, max_disparity=args.max_disparity, convergence=args.convergence, depth_kind=args.depth_kind,
        close_kernel=args.close_kernel, splat=args.splat, steps=args.steps, chunk_frames=args.chunk_frames,
        overlap_frames=args.overlap_frames, blend_overlap=not args.no_blend_overlap, tile=args.tile,
        tile_overlap=args.tile_overlap, fps=args.fps, fps_id=args.fps_id, decode_chunk_size=args.decode_chunk_size,
        device=args.device, dtype=args.dtype, seed=args.seed, crf=args.crf, lossless=args.lossless, save_intermediates=args.save_intermediates, progress=not args.no_progress,
    )
    report = convert(args.input, args.checkpoint or args.model, args.out, depth=args.depth, depth_model=args.depth_model, options=options)
    print(f"wrote {report.output}: {report.frames} frames {report.height}x{report.width} as {report.format}, "
          f"{report.chunks} chunk(s) x {report.tiles_per_chunk} tile(s), {report.frames_per_second:.2f} frames/s")


def _bench(args: argparse.Namespace) -> None:
    from lightning_m2s import bench

    bench.main(args.names, as_json=args.json, quick=args.quick)


RAW = argparse.RawDescriptionHelpFormatter  # keeps the examples' lines


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="m2s", description=__doc__, formatter_class=RAW, epilog=_example(
        "m2s sweep left_cond && m2s dashboard     # a grid, then its answer in the MLflow UI"))
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_train, _add_sweep, _add_evaluate, _add_dashboard, _add_notebook, _add_convert, _add_pretrain,
                _add_import_release, _add_bench):  # in the order `m2s --help` lists them
        add(sub)
    return parser


def _command(sub, name: str, func, **kwargs) -> argparse.ArgumentParser:
    """The parser of subcommand `name`, whose parsed arguments go to `func`."""
    p = sub.add_parser(name, formatter_class=RAW, **kwargs)
    p.set_defaults(func=func)
    return p


def _add_train(sub) -> None:
    p = _command(sub, "train", _train, help="train and test one experiment",
                 epilog=_example("m2s train tiny trainer.max_steps=10"))
    p.add_argument("experiment", nargs="?", default="tiny", help="a name in experiments/ or a YAML path")
    p.add_argument("overrides", nargs="*", help="dotlist overrides, e.g. optim.lr=1e-4 trainer.max_steps=10")


def _add_sweep(sub) -> None:
    p = _command(sub, "sweep", _sweep, help="run (or resume) an ablation grid from sweeps/", epilog=_sweeps_epilog())
    p.add_argument("ablation", help="a name in sweeps/ (listed below) or a YAML path")
    p.add_argument("overrides", nargs="*", help="dotlist overrides applied to every trial")
    p.add_argument("--experiment", help="the experiment every trial starts from (default: the sweep's, tiny)")
    p.add_argument("--trials", type=int, help="run at most this many trials now")
    p.add_argument("--storage", help="Optuna storage URL (default sqlite:///<checkout>/optuna.db)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default sqlite:///<checkout>/mlflow.db)")
    p.add_argument("--workers", type=int, help="worker processes on this study: on this machine (each pinned to its "
                   "--devices-per-trial accelerators, CPU threads split), or the SLURM array size")
    p.add_argument("--devices-per-trial", type=int, help="accelerators (GPUs) of each trial: trainer.devices, and "
                   "each worker's CUDA_VISIBLE_DEVICES share (default 1)")
    p.add_argument("--launcher", choices=["local", "slurm"], default="local",
                   help="local: processes on this machine; slurm: a job array through submitit (requeued on "
                   "preemption, its trial resumes from last.ckpt)")
    p.add_argument("--trials-only", action="store_true", help="run trials only: the floors, the table and the parent "
                   "run's summary are left to a later m2s sweep (what the --workers processes do)")
    p.add_argument("--partition", help="slurm: the partition (default: the sweep file's slurm.partition)")
    p.add_argument("--time-min", type=int, help="slurm: each job's time limit in minutes (default: slurm.time_min, 240)")


def _add_evaluate(sub) -> None:
    p = _command(sub, "evaluate", run_evaluate,
                 help="score a trained checkpoint on test sources (metrics, floors, per-clip rows)",
                 description="The test stage of a sweep trial for one checkpoint: the experiment's metrics on "
                 "its test clips (or --sources), the floors (warp-only, classical fill) on the same clips, "
                 "per-clip rows, all logged to MLflow as a run of its own.",
                 epilog=_example(f"m2s evaluate {CKPT}", f"m2s evaluate {CKPT} --sources real,folder=my_clips"))
    p.add_argument("checkpoint", help="a lightning_m2s training checkpoint (.ckpt), or a model directory (m2s import-release)")
    p.add_argument("overrides", nargs="*", help="dotlist overrides, e.g. data.eval_size=128 module.eval.steps=[1,5]")
    p.add_argument("--experiment", default="tiny", help="the experiment whose test data and metrics are used (default tiny)")
    p.add_argument("--sources", metavar="SOURCE[,SOURCE...]",
                   help="test sources instead of the experiment's, comma-separated: synthetic, real (the embedded "
                   "held-out sets), folder=DIR (your own <video>/left.mp4, right.mp4, disparity.npz), stereo4d=DIR, ego4d=DIR")
    p.add_argument("--no-floors", action="store_true", help="skip the warp-only and classical-fill floors")


def _add_dashboard(sub) -> None:
    p = _command(sub, "dashboard", _dashboard, help="serve the MLflow UI over the tracking store",
                 description="Serves the MLflow UI on 127.0.0.1 and prints first the latest sweep's arms and "
                 "floors side by side (open that link), then its summary figure; Ctrl-C stops it.",
                 epilog=_example("m2s dashboard --port 5001"))
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default sqlite:///<checkout>/mlflow.db)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=5000)


def _add_notebook(sub) -> None:
    p = _command(sub, "notebook", _notebook, help="execute notebooks/tables_4_10.ipynb headless and write its HTML report",
                 epilog=_example("m2s notebook --out report.html"))
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default sqlite:///<checkout>/mlflow.db)")
    p.add_argument("--out", type=Path, help="HTML report (default notebooks/tables_4_10.html)")


def _add_convert(sub) -> None:
    p = _command(
        sub, "convert", _convert,
        help="convert a monocular video to stereo (sbs, half-sbs, top-bottom, anaglyph, right)",
        description="Monocular video -> stereo video: depth -> disparity -> forward splat -> mask closing -> "
        "refinement by a trained checkpoint -> export. Output layouts: sbs (full side-by-side, 2W), half-sbs "
        "(W), top-bottom (2H), half-top-bottom (H), anaglyph (red-cyan, Dubois), right (the right view only). "
        "After a sweep, convert with an arm's best.ckpt (the sweep's table says which).",
        epilog=_example(f"m2s convert video.mp4 --checkpoint {CKPT} --depth depth.npz --out stereo.mp4",
                        "m2s convert video.mp4 --model /models/m2svid --depth-model /models/depth-anything-v2 "
                        "--out stereo.mp4"),
    )
    p.add_argument("input", help="the input video (the left view); only read")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--checkpoint", help="a lightning_m2s training checkpoint (.ckpt)")
    g.add_argument("--model", help="a model directory, e.g. the authors' model imported by m2s import-release")
    p.add_argument("--out", required=True, help="the output video (.mp4, .mkv or .mov), written atomically")
    p.add_argument("--format", default="sbs", choices=["sbs", "half-sbs", "top-bottom", "half-top-bottom", "anaglyph", "right"],
                   help="stereo layout: sbs | half-sbs | top-bottom | half-top-bottom | anaglyph | right (default sbs)")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--depth", help="depth file: .npy / .npz [T, H, W], a folder of 16-bit PNGs, or a video (luma = inverse depth)")
    g.add_argument("--depth-model", help="a local transformers depth-estimation model directory (e.g. Depth Anything V2)")
    p.add_argument("--depth-kind", default="auto", choices=["auto", "depth", "inverse"],
                   help="what the depth file holds (auto: inverse for PNGs, videos and npz 'disparity'; depth otherwise)")
    p.add_argument("--max-disparity", type=float, help="D_max in pixels (default 5%% of the width)")
    p.add_argument("--convergence", type=float, default=0.0, help="zero-parallax plane as a fraction 0..1 of D_max (default 0)")
    p.add_argument("--close-kernel", type=int, help="mask closing kernel (default 11 at 512 px, scaled, odd)")
    p.add_argument("--splat", default="nearest", choices=["nearest", "released"],
                   help="the warp: nearest (depth-tested, default) or released (the M2SVid release's; use it for a "
                   "model trained with data.splat=released, e.g. svd_xt)")
    p.add_argument("--steps", type=int, help="refinement steps (default: the checkpoint's, 1)")
    p.add_argument("--chunk-frames", type=int, default=16, help="frames per refinement chunk (default 16)")
    p.add_argument("--overlap-frames", type=int, default=4, help="generated frames carried into the next chunk (default 4)")
    p.add_argument("--no-blend-overlap", action="store_true", help="keep the last chunk's carried frames as they are "
                   "(default: cross-fade them to the next chunk's prediction)")
    p.add_argument("--tile", type=int, help="tile side in pixels for high resolution (default: whole frame)")
    p.add_argument("--tile-overlap", type=int, help="tile overlap in pixels, blended in latent space (default: tile / 4)")
    p.add_argument("--fps", type=float, help="output frame rate (default: the input's)")
    p.add_argument("--fps-id", type=float, help="the model's fps conditioning (default: the input's fps)")
    p.add_argument("--decode-chunk-size", type=int, default=8, help="frames per VAE decoder call (default 8)")
    p.add_argument("--device", help="cpu | cuda (default: cuda when available)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="autocast the model's calls (bfloat16 or float16 on GPUs; default: the model's setting)")
    p.add_argument("--seed", type=int, default=0, help="seed of the condition noise augmentation")
    p.add_argument("--crf", type=int, default=18, help="H.264 quality (default 18)")
    p.add_argument("--lossless", action="store_true", help="lossless RGB H.264 (bit-exact, large)")
    p.add_argument("--save-intermediates", metavar="DIR", help="also write depth.mp4, warped.mp4 and mask.mp4 there")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _add_pretrain(sub) -> None:
    p = _command(sub, "pretrain", run_pretrain,
                 help="the recipes of the shipped tiny SVD: vae, decoder, prior, export (make weights)",
                 epilog=_example("m2s pretrain vae steps=100 --out /tmp/vae   # a short run"))
    p.add_argument("recipe", choices=["vae", "decoder", "prior", "export"])
    p.add_argument("settings", nargs="*", help="recipe settings as key=value, e.g. steps=100")
    p.add_argument("--out", type=Path, help="output folder (default outputs/pretrain/<recipe>); a rerun resumes it")
    p.add_argument("--vae", type=Path, help="decoder, prior: the trained VAE (default outputs/pretrain/vae/vae); "
                   "export: the vae recipe's folder (default outputs/pretrain/vae)")
    p.add_argument("--decoder", type=Path, help="export: the decoder recipe's folder, whose VAE ships when it is "
                   "finished (default outputs/pretrain/decoder)")
    p.add_argument("--prior", type=Path, help="export: the prior recipe's folder (default outputs/pretrain/prior)")
    p.add_argument("--dest", type=Path, help="export: the weights folder (default weights/)")


def _add_import_release(sub) -> None:
    p = _command(sub, "import-release", run_import_release,
                 help="import the authors' released M2SVid weights into a model directory",
                 description="Reads the authors' released weight file (m2svid_weights.pt or "
                 "m2svid_no_full_atten_weights.pt; never runs code from it), maps its UNet to diffusers' "
                 "UNetSpatioTemporalConditionModel and writes a model directory that loads like any other: "
                 "model.pretrained=DIR, m2s evaluate DIR, m2s convert --model DIR.",
                 epilog=_example("m2s import-release m2svid_weights.pt --svd /models/img2vid-xt --out /models/m2svid"))
    p.add_argument("weights", help="the released .pt file (a DeepSpeed model-states dict)")
    p.add_argument("--out", required=True, help="the model directory to write (must not exist or be empty)")
    p.add_argument("--svd", help="a local stable-video-diffusion-img2vid-xt directory: its VAE, image encoder and "
                   "feature extractor are linked into --out (needed to convert and evaluate), its unet/config.json "
                   "gives the UNet config")
    p.add_argument("--unet-config", help="the UNet config (diffusers JSON) instead of img2vid-xt's")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--full-attention", dest="full_attention", action="store_true", default=None,
                   help="the weights use disocclusion full attention (default: from the file name)")
    g.add_argument("--no-full-attention", dest="full_attention", action="store_false",
                   help="the weights do not use it (m2svid_no_full_atten_weights.pt)")
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"],
                   help="the UNet's stored dtype (default float16, as released)")
    p.add_argument("--copy", action="store_true", help="copy img2vid-xt's parts instead of linking them")


def _add_bench(sub) -> None:
    p = _command(sub, "bench", _bench, help="run benchmarks and print their figures",
                 epilog=_example("m2s bench splat --quick"))
    p.add_argument("names", nargs="+", help="benchmark names, or 'all'")
    p.add_argument("--json", action="store_true", help="print one JSON object per benchmark")
    p.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke run (printed, never written to benchmarks/)")


def quiet_libraries() -> None:
    """Keep the console to progress bars and reports: Lightning's start-up notes (accelerators found, a
    logger tip, the test-batch limit) are informational log records; warnings and errors still show."""
    import logging
    import warnings

    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero",
                 "lightning.pytorch.trainer.connectors.checkpoint_connector"):  # and its note on each save
        logging.getLogger(name).setLevel(logging.WARNING)
    # Lightning's own use of a torch API that torch deprecated: nothing a user can act on
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    quiet_libraries()
    try:
        args.func(args)
    except M2SError as err:
        print(f"m2s {args.command}: error: {err}", file=sys.stderr)
        sys.exit(2)
    except Interrupted as err:  # SIGTERM / SIGINT: what was saved, and the shell's 128 + signal number
        print(f"m2s {args.command}: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        print(f"m2s {args.command}: stopped by SIGINT", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
