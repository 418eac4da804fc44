"""The `m2s` commands that take or make a model outside training: evaluate (score a checkpoint or model
directory), pretrain (the recipes of the shipped weights), import-release (the authors' weights -> a model
directory). The parser that routes to them is cli.py's."""

from __future__ import annotations

import argparse
from pathlib import Path


# `m2s evaluate --sources`: the embedded test sets by name, the user's or the paper's data by root
EMBEDDED_TEST_SETS = {"synthetic": 0, "real": 1}  # index into datamodule.DEFAULT_TEST
ROOTED_SOURCES = ("folder", "stereo4d", "ego4d")


def test_source(spec: str) -> dict:
    """`synthetic` | `real` | `folder=DIR` | `stereo4d=DIR` | `ego4d=DIR` -> a data.test_sources entry."""
    from lightning_m2s.data.datamodule import DEFAULT_TEST
    from lightning_m2s.errors import ConfigError

    name, _, root = spec.partition("=")
    if name in EMBEDDED_TEST_SETS and not root:
        return dict(DEFAULT_TEST[EMBEDDED_TEST_SETS[name]])
    if name in ROOTED_SOURCES and root:
        return {"name": name, "root": root}
    raise ConfigError(f"--sources {spec!r}: use {', '.join(EMBEDDED_TEST_SETS)} or "
                      f"{', '.join(f'{n}=DIR' for n in ROOTED_SOURCES)}")


def run_evaluate(args: argparse.Namespace) -> None:
    from omegaconf import OmegaConf

    from lightning_m2s.config import load_config
    from lightning_m2s.evaluation import evaluate_checkpoint

    cfg = load_config(args.experiment, args.overrides)
    if args.sources:
        cfg.data.test_sources = OmegaConf.create([test_source(s) for s in args.sources.split(",")])
    report = evaluate_checkpoint(args.checkpoint, cfg, with_floors=not args.no_floors)
    rows = {"": report["metrics"], **{f"floor: {v}": m for v, m in report["floors"].items()}}
    keys = sorted(k for k in report["metrics"] if k.startswith("test/") and k.rsplit("/", 1)[-1] in ("psnr", "lpips"))
    print(f"\n{'':<24}" + "".join(f"{k.removeprefix('test/'):>18}" for k in keys))
    for name, metrics in rows.items():
        print(f"{name or Path(args.checkpoint).name:<24.24}" + "".join(f"{metrics.get(k, float('nan')):>18.4f}" for k in keys))
    print(f"per-clip metrics: {report['per_clip']}; MLflow run {report['run_id']}")


def run_pretrain(args: argparse.Namespace) -> None:
    import logging

    import yaml

    from lightning_m2s.errors import ConfigError

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if any("=" not in item for item in args.settings):
        raise ConfigError(f"pretrain settings must be key=value, got {args.settings}")
    settings = {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in args.settings)}
    from lightning_m2s.config import work_root

    root = work_root() / "outputs" / "pretrain"
    out = args.out or root / args.recipe
    if args.recipe == "vae":
        from lightning_m2s.pretrain.vae import train_vae

        m = train_vae(out, settings)
        print(f"pretrain vae: {out / 'vae'}: held-out PSNR " + ", ".join(f"{k} {v:.2f} dB" for k, v in m["psnr_heldout"].items()))
    elif args.recipe == "decoder":
        from lightning_m2s.pretrain.vae import refine_decoder

        m = refine_decoder(args.vae or root / "vae" / "vae", out, settings)
        print(f"pretrain decoder: {out / 'vae'}: held-out PSNR {m['psnr_heldout']}, LPIPS {m['lpips_heldout']}")
    elif args.recipe == "prior":
        from lightning_m2s.pretrain.prior import train_prior

        m = train_prior(args.vae or root / "vae" / "vae", out, settings)
        print(f"pretrain prior: {out / 'unet'}: held-out loss {m['heldout_loss']} (at init {m['heldout_loss_init']})")
    else:
        from lightning_m2s.pretrain.export import export

        if settings:
            raise ConfigError("pretrain export takes no settings")
        decoder = args.decoder or root / "decoder"
        manifest = export(args.vae or root / "vae", args.prior or root / "prior",
                          decoder if (decoder / "metrics.json").is_file() else None, args.dest)
        print(f"pretrain export: {len(manifest['files'])} files, {manifest['size_mb']:.1f} MB, manifest written")


def run_import_release(args: argparse.Namespace) -> None:
    from lightning_m2s.models.released import import_release

    record = import_release(args.weights, args.out, svd=args.svd, unet_config=args.unet_config,
                            full_attention=args.full_attention, dtype=args.dtype, copy=args.copy)
    placed = record.get("svd_parts", {})
    parts = ", ".join(f"{p} ({how})" for how in ("linked", "copied") for p in placed.get(how, []))
    parts = parts or "none (import with --svd to convert and evaluate with it)"
    print(f"wrote {args.out}: unet ({record['unet']['tensors']} tensors, {record['unet']['dtype']}), full attention "
          f"{'on' if record['full_attention'] else 'off'} (from {record['full_attention_from']}), img2vid-xt parts: {parts}")
