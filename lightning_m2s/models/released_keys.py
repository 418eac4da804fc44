"""The key mapping of the authors' released UNet, sgm VideoUNet -> diffusers' UNetSpatioTemporalConditionModel,
built from the UNet config's block structure so that every release key has exactly one target and every
target exactly one source:
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

import re

import torch

from lightning_m2s.errors import ModelError

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
