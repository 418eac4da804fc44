"""The authors' released M2SVid weights: import (sgm VideoUNet -> diffusers), their settings, their forward.

Their release (`m2svid_weights.pt`: full attention; `m2svid_no_full_atten_weights.pt`: without) is a
DeepSpeed model-states dict. Its `module` entry holds `module.`-prefixed keys; the UNet's are
`module.model.diffusion_model.<sgm VideoUNet key>`, the rest (VAE, CLIP, denoiser) are frozen img2vid-xt.
`import_release` reads it without running code from it and writes a diffusers-format M2SVid directory:

    DIR/unet/            UNetSpatioTemporalConditionModel, 13 input channels (safetensors, fp16 by default)
    DIR/vae/ image_encoder/ feature_extractor/ scheduler/   img2vid-xt's, with `svd` (links or copies)
    DIR/m2svid.json      the source file and its sha256, full attention on / off, the release's settings

It loads wherever a model loads: `model.pretrained=DIR` (training, fine-tuning), `m2s evaluate DIR` and
`m2s convert --model DIR` (`load_model_dir`: the release's settings from m2svid.json).

The key mapping (sgm -> diffusers) is in released_keys.py.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings
import zipfile
from pathlib import Path

import torch

from lightning_m2s.errors import ModelError
from lightning_m2s.models.released_keys import (  # noqa: F401 - the mapping's public names, importable from here too
    RESNET, TOP, block_table, convert_unet_state, diffusers_key)

RELEASE_JSON = "m2svid.json"
SVD_PARTS = ("vae", "image_encoder", "feature_extractor", "scheduler")  # taken from img2vid-xt
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
FORMAT = 1  # of m2svid.json

# The `model:` settings (experiments/base.yaml keys) that run the directory as the release does.
RELEASE_MODEL = dict(
    left_condition=True,  # 13 input channels
    embedding="clip",  # every left frame's CLIP embedding as cross-attention context
    attention_policy="bilinear",  # token mask: the latent mask bilinearly resized to each layer's grid, > 0
    attention_kv="pre_norm",  # full attention's keys / values: the block input before its LayerNorm
    mask_dilation=3,
    mask_resize="bilinear",
    motion_bucket_id=127,
    cond_aug_eval=0.02,
    sigma_max=700.0,
)
# What the release does at inference (recorded in m2svid.json): m2s convert --model does it, given
# --splat released and --decode-chunk-size equal to --chunk-frames.
RELEASE_INFERENCE = dict(
    steps=1,  # one Euler step from a zero latent at sigma_max
    sigma=700.0,
    fps_id="the video's fps",
    motion_bucket_id=127,
    cond_aug=0.02,  # also added as pixel noise to both condition videos
    max_disparity="int(0.05 * width)",
    splat="released",
    decode="all frames of a chunk in one call",
)
# Keys of a `model:` section that only choose how to run (not what the model is); kept from the caller.
RUNTIME_KEYS = ("autocast_dtype", "encode_chunk_size", "decode_chunk_size", "gradient_checkpointing")


# --- reading the release ------------------------------------------------------------------------------
def read_release(path: str | Path) -> dict[str, torch.Tensor]:
    """The sgm UNet tensors of a released file, keyed without `module.model.diffusion_model.`.

    Loaded with weights_only: tensors and plain containers only, so a crafted file never runs code; one
    that needs anything else is refused with an error naming the file and the type."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: no such file")
    try:  # mmap: the 4.6 GB file is paged in tensor by tensor, not read whole (zip format only)
        with warnings.catch_warnings():  # torch's note on a pickle protocol it may not read: the error says it
            warnings.simplefilter("ignore", UserWarning)
            raw = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as err:  # noqa: BLE001 - any unpickling failure means the file cannot be trusted or read
        found = _foreign_globals(path)
        reason = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", str(err))
        reason = reason.group(1) if reason else (str(err).strip().splitlines() or [type(err).__name__])[0]
        what = f"needs {', '.join(found[:4])}" if found else f"cannot be read by the weights-only loader ({reason.split('. ')[0][:160]})"
        raise ModelError(f"{path}: refused: the file {what}; a weights file may hold only tensors and plain "
                         "containers (it is loaded with torch.load(weights_only=True) and never runs code)") from None
    module = raw.get("module") if isinstance(raw, dict) else None
    if not isinstance(module, dict):
        found = sorted(raw)[:8] if isinstance(raw, dict) else type(raw).__name__
        raise ModelError(f"{path}: not a DeepSpeed model-states file (no 'module' dict; found {found})")
    unet = {}
    for key, value in module.items():
        key = key.removeprefix("module.")  # DeepSpeed's wrapper, as their loader strips it
        if not key.startswith("model.diffusion_model."):
            continue  # frozen VAE, CLIP, denoiser: taken from img2vid-xt instead
        if not isinstance(value, torch.Tensor):
            raise ModelError(f"{path}: {key} is a {type(value).__name__}, not a tensor")
        unet[key.removeprefix("model.diffusion_model.")] = value
    if not unet:
        raise ModelError(f"{path}: no UNet weights (no 'module.model.diffusion_model.*' keys in 'module')")
    return unet


def _foreign_globals(path: Path) -> list[str]:
    """The callables a pickle (a torch zip's data.pkl, or a plain / legacy pickle) would import, other than
    torch's and plain containers'. Read with pickletools, which only parses: nothing is imported or run."""
    import io
    import pickletools

    containers = {"collections.OrderedDict", "builtins.set", "builtins.frozenset", "builtins.bytearray", "_codecs.encode"}
    names: list[str] = []
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                pkl = next((n for n in archive.namelist() if n.endswith("data.pkl")), None)
                stream = io.BytesIO(archive.read(pkl) if pkl else b"")
        else:
            stream = open(path, "rb")  # noqa: SIM115 - closed below
        with stream:
            for _ in range(4):  # a legacy torch file is 4 pickles (magic, protocol, sys info, data), then bytes
                strings: list[str] = []
                for op, arg, _ in pickletools.genops(stream):
                    if isinstance(arg, str):
                        strings.append(arg)
                    if op.name in ("GLOBAL", "INST"):
                        names.append(arg.replace(" ", "."))
                    elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                        names.append(f"{strings[-2]}.{strings[-1]}")
    except Exception:  # noqa: BLE001 - the end of the pickles, or a file that is not one
        pass
    return list(dict.fromkeys(n for n in names if not n.startswith("torch.") and n not in containers))


def full_attention_from_name(path: str | Path) -> bool | None:
    """True for m2svid_weights*.pt, False for m2svid_no_full_atten*.pt, None when the name does not say."""
    name = Path(path).name.lower()
    if "no_full_att" in name:
        return False
    if name.startswith("m2svid_weights"):
        return True
    return None


# --- the import -----------------------------------------------------------------------------------------
def _read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ModelError(f"{path}: cannot read the {what}: {err}") from None
    if not isinstance(data, dict):
        raise ModelError(f"{path}: the {what} is not a JSON object")
    return data


def resolve_unet_config(sgm_state: dict, svd: Path | None = None, unet_config: Path | None = None) -> tuple[dict, str]:
    """The diffusers UNet config of the release and where it came from: `unet_config`, else img2vid-xt's
    (`svd`/unet/config.json, else diffusers' defaults, which are img2vid-xt's), with the release's conv_in
    width (13). The number of heads is not in the weights: it comes from here."""
    if unet_config is not None:
        config, origin = _read_json(unet_config, "UNet config"), str(unet_config)
    elif svd is not None:
        config, origin = _read_json(svd / "unet" / "config.json", "UNet config"), str(svd / "unet" / "config.json")
    else:
        config, origin = {}, "img2vid-xt's (diffusers' defaults)"
    conv_in = sgm_state.get("input_blocks.0.0.weight")
    config["in_channels"] = int(conv_in.shape[1]) if conv_in is not None and conv_in.ndim == 4 else 13
    return config, origin


def _meta_unet(config: dict, origin: str):
    """The diffusers UNet of `config` on the meta device (no memory): its config and key -> shape."""
    from diffusers import UNetSpatioTemporalConditionModel

    keys = {k: v for k, v in config.items() if not k.startswith("_")}
    try:
        with torch.device("meta"):
            unet = UNetSpatioTemporalConditionModel.from_config(keys)
    except (TypeError, ValueError, KeyError) as err:
        raise ModelError(f"{origin}: not a UNetSpatioTemporalConditionModel config: {err}") from None
    return unet


def _place_svd_parts(svd: Path, out: Path, copy: bool) -> dict:
    """Link (or copy) img2vid-xt's parts into `out`; a file system without links gets copies."""
    from lightning_m2s.models.pretrained import check_svd_directory

    check_svd_directory(svd, components=("vae", "image_encoder", "feature_extractor"))
    linked, copied = [], []
    for part in SVD_PARTS:
        src = svd / part
        if not src.is_dir():
            continue
        if not copy:  # img2vid-xt's 2.5 GB stay where they are
            try:
                os.symlink(src.resolve(), out / part, target_is_directory=True)
                linked.append(part)
                continue
            except OSError:  # e.g. Windows without the right to make links
                pass
        shutil.copytree(src, out / part)
        copied.append(part)
    return {"linked": linked, "copied": copied}


def _svd_variant(svd: Path) -> str | None:
    """"fp16" when img2vid-xt's VAE is there only as the fp16 variant (diffusion_pytorch_model.fp16.*)."""
    files = [p.name for p in (svd / "vae").glob("diffusion_pytorch_model*")]
    plain = any(n in files for n in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"))
    return "fp16" if not plain and any(".fp16." in n for n in files) else None


def _full_attention(weights: Path, full_attention: bool | None) -> tuple[bool, str]:
    """Whether the weights use full attention, and who says so: the caller, else the file name."""
    if full_attention is not None:
        return full_attention, "the caller"
    from_name = full_attention_from_name(weights)
    if from_name is None:
        raise ModelError(f"{weights}: the file name does not say whether the model uses full attention "
                         "(m2svid_weights.pt / m2svid_no_full_atten_weights.pt): pass --full-attention or "
                         "--no-full-attention")
    return from_name, "the file name"


def import_release(
    weights: str | Path,
    out: str | Path,
    svd: str | Path | None = None,
    unet_config: str | Path | None = None,
    full_attention: bool | None = None,
    dtype: str = "float16",
    copy: bool = False,
) -> dict:
    """Import a released weight file into the M2SVid directory `out` (see the module docstring); returns
    the record written to out/m2svid.json. full_attention None: from the file name. copy: copy img2vid-xt's
    parts from `svd` instead of linking them. The directory appears only when complete."""
    from safetensors.torch import save_file

    from lightning_m2s.files import temporary
    from lightning_m2s.models.embedded import sha256

    weights, out = Path(weights), Path(out)
    svd = Path(svd).expanduser() if svd is not None else None
    if dtype not in DTYPES:
        raise ModelError(f"dtype {dtype!r}: choose from {sorted(DTYPES)}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ModelError(f"{out}: exists and is not empty; choose another --out or remove it")

    # 1. The release's UNet tensors (never runs code from the file), with or without full attention
    sgm_state = read_release(weights)
    full_attention, attention_from = _full_attention(weights, full_attention)

    # 2. sgm keys -> diffusers keys, checked against the config's UNet
    config, origin = resolve_unet_config(sgm_state, svd, Path(unet_config) if unet_config else None)
    meta = _meta_unet(config, origin)
    expected = {k: v.shape for k, v in meta.state_dict().items()}
    state = convert_unet_state(sgm_state, dict(meta.config), expected, str(weights))

    # 3. The record (m2svid.json): the source file, the UNet written, the settings that run it as released
    record = {
        "format": FORMAT,
        "source": {"file": os.path.abspath(weights), "sha256": sha256(weights), "bytes": weights.stat().st_size},
        "full_attention": bool(full_attention),
        "full_attention_from": attention_from,
        "unet": {"dtype": dtype, "tensors": len(state), "config_from": origin},
        "svd": str(svd.resolve()) if svd is not None else None,
        "model": {**RELEASE_MODEL, "full_attention": bool(full_attention)},
        "inference": RELEASE_INFERENCE,
    }
    variant = _svd_variant(svd) if svd is not None else None
    if variant:  # the whole directory then loads with model.variant=fp16, as img2vid-xt's fp16-only copies do
        record["model"]["variant"] = variant

    # 4. The directory: unet/ (safetensors), img2vid-xt's parts, m2svid.json
    with temporary(out, directory=True) as tmp:
        meta.save_config(tmp / "unet")
        tensors = {k: v.to(DTYPES[dtype]).contiguous() for k, v in state.items()}
        name = f"diffusion_pytorch_model{'.' + variant if variant else ''}.safetensors"
        save_file(tensors, str(tmp / "unet" / name), metadata={"format": "pt"})
        if svd is not None:
            record["svd_parts"] = _place_svd_parts(svd, tmp, copy)
        (tmp / RELEASE_JSON).write_text(json.dumps(record, indent=2) + "\n")
    return record


# --- loading an imported directory ----------------------------------------------------------------------
def read_record(model_dir: str | Path) -> dict | None:
    """m2svid.json of an imported directory (None for another diffusers SVD directory)."""
    path = Path(model_dir) / RELEASE_JSON
    return _read_json(path, "import record") if path.is_file() else None


def model_settings(model_dir: str | Path) -> dict:
    """The `model:` section that runs `model_dir` as its record says (only `pretrained` without a record)."""
    record = read_record(model_dir)
    return {"pretrained": str(model_dir), **(record["model"] if record else {})}


def load_model_dir(model_dir: str | Path, **runtime) -> tuple:
    """(StereoRefiner in eval mode, eval settings) of an imported directory, run as released; `runtime`:
    RUNTIME_KEYS (autocast_dtype, chunk sizes) only."""
    from lightning_m2s.models.refiner import build_refiner

    root = Path(model_dir).expanduser()
    unknown = sorted(set(runtime) - set(RUNTIME_KEYS))
    if unknown:
        raise ModelError(f"{root}: {unknown} cannot be changed when loading a model directory")
    settings = model_settings(root)
    absent = [p for p in ("unet", "vae", "image_encoder", "feature_extractor") if not (root / p).is_dir()]
    if absent and (root / RELEASE_JSON).is_file():
        raise ModelError(f"{root}: no {', '.join(absent)}/: import the release with --svd IMG2VID_XT_DIR to add "
                         "img2vid-xt's VAE and image encoder")
    return build_refiner(**settings, **runtime).eval(), {"steps": 1}


# --- the release's network on given tensors ----------------------------------------------------------------
@torch.no_grad()
def unet_reference_forward(model_dir: str | Path, io: dict) -> torch.Tensor:
    """The imported UNet on the release's raw network inputs, by the project's forward (its processors and
    per-frame context, full attention as recorded in model_dir); returns F, [B*T, 4, h, w].

    io: x [B*T, 13, h, w]; timesteps [B*T] (c_noise); context [B*T, 1, D] (one embedding per frame);
    fps_id, motion_bucket_id, cond_aug [B]; inpainting_mask [B*T, h, w] (+1 hole, -1 known); y [B, ...]."""
    from lightning_m2s.models.attention import install_attention_processors
    from lightning_m2s.models.unet import load_unet

    record = read_record(model_dir)
    if record is None:
        raise ModelError(f"{Path(model_dir) / RELEASE_JSON}: missing; import the release with m2s import-release")
    settings = record["model"]
    unet = load_unet(model_dir, torch_dtype=torch.float32).eval()
    controller = install_attention_processors(unet, full_attention=settings["full_attention"],
                                              policy=settings["attention_policy"], kv_source=settings["attention_kv"])
    x = io["x"].float()
    BT, C, h, w = x.shape
    B = io["fps_id"].shape[0]
    T = BT // B
    if controller is not None:  # the +1 / -1 latent mask as a hole fraction; each layer resizes it bilinearly
        controller.set_mask((io["inpainting_mask"].float().reshape(B, T, h, w) + 1) / 2, latent_hw=(h, w))
    added_time_ids = torch.stack([io["fps_id"], io["motion_bucket_id"], io["cond_aug"]], dim=1).float()  # [B, 3]
    out = unet(
        x.reshape(B, T, C, h, w),
        io["timesteps"].reshape(B, T)[:, 0].float(),
        encoder_hidden_states=io["context"].float().reshape(B, T, -1),  # [B, T, D]: one token per frame
        added_time_ids=added_time_ids,
        return_dict=False,
    )[0]  # [B, T, 4, h, w]
    return out.reshape(BT, -1, h, w)
