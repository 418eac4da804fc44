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

Key mapping (sgm -> diffusers), built from the UNet config's block structure so that every release key
has exactly one target and every target exactly one source:
    input_blocks.0.0                 conv_in
    input_blocks.<n>.0 / .1          down_blocks.<i>.resnets.<j> / attentions.<j>   (n = 1 + i (L + 1) + j)
    input_blocks.<n>.0.op            down_blocks.<i>.downsamplers.0.conv            (n = (i + 1)(L + 1))
    middle_block.0 / 1 / 2           mid_block.resnets.0 / attentions.0 / resnets.1
    output_blocks.<n>.0 / .1         up_blocks.<i>.resnets.<j> / attentions.<j>     (n = i (L + 2) + j)
    output_blocks.<n>.<last>.conv    up_blocks.<i>.upsamplers.0.conv
    time_embed.0 / 2, label_emb.0.0 / 2, out.0 / 2   time_embedding, add_embedding .linear_1 / 2, conv_norm_out, conv_out
Inside a resnet: in_layers.0 / 2, emb_layers.1, out_layers.0 / 3, skip_connection -> spatial_res_block.norm1,
conv1, time_emb_proj, norm2, conv2, conv_shortcut; time_stack.* the same into temporal_res_block.*; its
own time_mixer.mix_factor. Inside a transformer: time_stack.<k> -> temporal_transformer_blocks.<k>,
time_pos_embed.0 / 2 -> linear_1 / 2; the rest keeps its name.
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

RELEASE_JSON = "m2svid.json"
SVD_PARTS = ("vae", "image_encoder", "feature_extractor", "scheduler")  # taken from img2vid-xt
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
FORMAT = 1  # of m2svid.json

# The `model:` settings that run the directory as the release does (refiner.REFINER_DEFAULTS keys).
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


# --- the key mapping ------------------------------------------------------------------------------------
RESNET = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
          "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
TOP = {"input_blocks.0.0": "conv_in", "time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
       "label_emb.0.0": "add_embedding.linear_1", "label_emb.0.2": "add_embedding.linear_2",
       "out.0": "conv_norm_out", "out.2": "conv_out"}


def _per_level(value, n: int) -> list[int]:
    return list(value) if isinstance(value, (list, tuple)) else [value] * n


def block_table(config: dict) -> dict[str, tuple[str, str]]:
    """sgm block prefix -> (diffusers prefix, kind), kind in resnet | transformer | down | up | top."""
    down, up = config["down_block_types"], config["up_block_types"]
    n = len(down)
    layers = _per_level(config["layers_per_block"], n)
    table = {k: (v, "top") for k, v in TOP.items()}
    index = 1
    for i, kind in enumerate(down):
        for j in range(layers[i]):
            table[f"input_blocks.{index}.0"] = (f"down_blocks.{i}.resnets.{j}", "resnet")
            if kind.startswith("CrossAttn"):
                table[f"input_blocks.{index}.1"] = (f"down_blocks.{i}.attentions.{j}", "transformer")
            index += 1
        if i < n - 1:
            table[f"input_blocks.{index}.0"] = (f"down_blocks.{i}.downsamplers.0", "down")
            index += 1
    table["middle_block.0"] = ("mid_block.resnets.0", "resnet")
    table["middle_block.1"] = ("mid_block.attentions.0", "transformer")
    table["middle_block.2"] = ("mid_block.resnets.1", "resnet")
    index = 0
    for i, kind in enumerate(up):
        per = layers[::-1][i] + 1
        for j in range(per):
            table[f"output_blocks.{index}.0"] = (f"up_blocks.{i}.resnets.{j}", "resnet")
            sub = 1
            if kind.startswith("CrossAttn"):
                table[f"output_blocks.{index}.1"] = (f"up_blocks.{i}.attentions.{j}", "transformer")
                sub = 2
            if j == per - 1 and i < n - 1:
                table[f"output_blocks.{index}.{sub}"] = (f"up_blocks.{i}.upsamplers.0", "up")
            index += 1
    return table


def _inner_name(kind: str, path: str) -> str | None:
    """A module path inside an sgm block -> its diffusers name (None: not a known part of that block)."""
    if kind == "resnet":
        if path == "time_mixer":
            return path
        temporal = path.startswith("time_stack.")
        name = RESNET.get(path.removeprefix("time_stack."))
        return name and ("temporal_res_block." if temporal else "spatial_res_block.") + name
    if kind == "transformer":
        if path in ("norm", "proj_in", "proj_out", "time_mixer"):
            return path
        if path in ("time_pos_embed.0", "time_pos_embed.2"):
            return "time_pos_embed.linear_" + ("1" if path.endswith("0") else "2")
        if re.fullmatch(r"transformer_blocks\.\d+\..+", path):
            return path
        if m := re.fullmatch(r"time_stack\.(\d+)\.(.+)", path):
            return f"temporal_transformer_blocks.{m.group(1)}.{m.group(2)}"
        return None
    if kind == "down":
        return "conv" if path == "op" else None
    if kind == "up":
        return "conv" if path == "conv" else None
    return None


def diffusers_key(sgm_key: str, table: dict[str, tuple[str, str]]) -> str | None:
    """The diffusers key of one sgm UNet key (None: no place for it in this config)."""
    module, _, param = sgm_key.rpartition(".")
    if module in table and table[module][1] == "top":
        return f"{table[module][0]}.{param}"
    m = re.match(r"((?:input_blocks|output_blocks)\.\d+\.\d+|middle_block\.\d+)\.(.+)", module)
    if m is None or m.group(1) not in table or table[m.group(1)][1] == "top":
        return None
    prefix, kind = table[m.group(1)]
    inner = _inner_name(kind, m.group(2))
    return f"{prefix}.{inner}.{param}" if inner else None


def _listing(keys, limit: int = 8) -> str:
    keys = sorted(keys)
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def convert_unet_state(sgm_state: dict[str, torch.Tensor], config: dict, expected: dict[str, torch.Size],
                       source: str) -> dict[str, torch.Tensor]:
    """sgm UNet tensors -> the diffusers state dict, every key mapped exactly once and every shape checked.

    expected: the diffusers UNet's key -> shape for `config`. A release key with no place in the config,
    two release keys on one target, a target no release key fills, or a differing shape is a ModelError
    naming them."""
    table = block_table(config)
    out, unexpected, source_of = {}, [], {}
    for key, value in sgm_state.items():
        target = diffusers_key(key, table)
        if target is None or target not in expected:
            unexpected.append(key)
            continue
        if target in source_of:
            raise ModelError(f"{source}: release keys {source_of[target]} and {key} both map to {target}")
        source_of[target] = key
        out[target] = value
    missing = sorted(set(expected) - set(out))
    if missing or unexpected:
        parts = [f"missing {len(missing)} key(s) the UNet config needs: {_listing(missing)}"] if missing else []
        parts += [f"unexpected {len(unexpected)} release key(s): {_listing(unexpected)}"] if unexpected else []
        raise ModelError(f"{source}: the released UNet does not match the UNet config ({'; '.join(parts)})")
    wrong = [f"{source_of[k]} {tuple(v.shape)} vs {k} {tuple(expected[k])}" for k, v in out.items()
             if tuple(v.shape) != tuple(expected[k])]
    if wrong:
        raise ModelError(f"{source}: {len(wrong)} tensor shape(s) differ from the UNet config: {_listing(wrong, 4)}")
    return out


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

    # 1. The release's UNet tensors (never runs code from the file)
    sgm_state = read_release(weights)
    if full_attention is None:
        full_attention = full_attention_from_name(weights)
        if full_attention is None:
            raise ModelError(f"{weights}: the file name does not say whether the model uses full attention "
                             "(m2svid_weights.pt / m2svid_no_full_atten_weights.pt): pass --full-attention or "
                             "--no-full-attention")
        attention_from = "the file name"
    else:
        attention_from = "the caller"

    # 2. sgm keys -> diffusers keys, checked against the config's UNet
    config, origin = resolve_unet_config(sgm_state, svd, Path(unet_config) if unet_config else None)
    meta = _meta_unet(config, origin)
    expected = {k: v.shape for k, v in meta.state_dict().items()}
    state = convert_unet_state(sgm_state, dict(meta.config), expected, str(weights))

    # 3. The directory: unet/ (safetensors), img2vid-xt's parts, m2svid.json
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
