"""Disocclusion full attention (paper Sec. 5.3) and per-frame cross-attention context.

Tokens inside the disocclusion mask attend to all tokens of all frames of their clip; the other
tokens keep SVD's per-frame spatial attention. The functional core is
`disocclusion_attention`; `DisocclusionAttnProcessor` runs it inside diffusers' spatial
self-attention layers (`...transformer_blocks.N.attn1`, never the temporal ones), installed with
diffusers' `set_attn_processor` (no copied UNet forward).

How the mask reaches the processors (no global state): `install_attention_processors(unet, ...)`
returns a `DisocclusionAttention` controller shared by the processors it installed. The caller sets
the current mask on it before each UNet call (`controller.set_mask(mask, latent_hw)`); the mask stays
set until the next `set_mask` / `clear`, so that gradient checkpointing, which re-runs the forward
inside backward, sees the same mask (and the same cached token masks, random cap included).

Token-mask policy (the mask is given as hole fraction in [0, 1] at any resolution, e.g. the pixel
mask; each layer's h x w grid is inferred from its token count L and the latent grid):
- "area" (default): a token is masked when the hole fraction of its cell exceeds `threshold`
  (0.5 = "more hole than not"). This is what the released code's bilinear resize of the +1/-1
  mask thresholded at > 0 does at a 2x reduction, without its sampling artefacts at larger ones.
- "any": a token is masked when any hole pixel falls in its cell (a superset of "area"; more
  full-attention tokens, more cost).
- "bilinear": the released code exactly: +1/-1 mask bilinearly resized (align_corners False, no
  antialias) to the latent grid, then to the layer grid, thresholded at > 0.
Optional training cap (released code): at most `max_tokens_per_frame * T` masked tokens per clip,
a random subset; default off (inference never caps).
"""

from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F

from lightning_m2s.errors import ConfigError, ModelError

POLICIES = ("area", "any", "bilinear")
KV_SOURCES = ("pre_norm", "normed")

# Spatial self-attention processors only; the leading "." excludes temporal_transformer_blocks.
SPATIAL_SELF_ATTN = re.compile(r"(^|\.)transformer_blocks\.\d+\.attn1\.processor$")
SPATIAL_CROSS_ATTN = re.compile(r"(^|\.)transformer_blocks\.\d+\.attn2\.processor$")
TEMPORAL_CROSS_ATTN = re.compile(r"temporal_transformer_blocks\.\d+\.attn2\.processor$")


def disocclusion_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    token_mask: torch.Tensor | None,
    num_frames: int,
    clip_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Per-frame attention, with full clip attention for masked queries.

    q, k, v: [B*T, heads, L, d], the T frames of a clip consecutive. token_mask: bool [B*T, L] (True =
    disoccluded) or None. clip_kv: the keys and values [B*T, heads, L, d] masked queries attend to
    (default k, v; the released code projects the block's input before its LayerNorm).
    Returns [B*T, heads, L, d]. Never builds a (T*L)^2 mask: one stock SDPA
    call over all queries per frame, then one SDPA call for the masked queries of every clip
    (gathered, zero-padded to the batch maximum; padded queries are computed and dropped, so no
    attention mask is needed: all keys of a clip are valid), scattered back.
    """
    BT, heads, L, d = q.shape
    if BT % num_frames != 0:
        raise ValueError(f"batch*frames {BT} is not a multiple of num_frames {num_frames}")
    B, T = BT // num_frames, num_frames

    # 1. Stock per-frame attention for every query: [B*T, heads, L, d]
    out = F.scaled_dot_product_attention(q, k, v)
    if token_mask is None:
        return out
    if token_mask.shape != (BT, L):
        raise ValueError(f"token_mask shape {tuple(token_mask.shape)} != {(BT, L)}")

    # 2. Indices of masked tokens, computed where the mask lives (the mask may be on CPU while q
    #    is on the meta device for FLOP counting): clip b, flat clip position pos = t*L + l, and the
    #    slot `rank` of the token in its clip's zero-padded row.
    clip_mask = token_mask.reshape(B, T * L)  # [B, T*L]
    n_max = int(clip_mask.sum(dim=1).max()) if B > 0 else 0
    if n_max == 0:
        return out
    b_idx, pos = clip_mask.nonzero(as_tuple=True)  # [K], [K]
    rank = (clip_mask.cumsum(dim=1) - 1)[b_idx, pos]  # [K]
    frame = b_idx * T + torch.div(pos, L, rounding_mode="floor")  # [K] row of q / out
    b_idx, pos, rank, frame, tok = (x.to(q.device) for x in (b_idx, pos, rank, frame, pos % L))

    # 3. Token-major views [B*T, L, heads, d]. diffusers' processors build q, k, v as transposed
    #    views of [B*T, L, heads*d] projections, so these are free and so is the clip layout of
    #    the keys and values: [B, T*L, heads, d] -> [B, heads, T*L, d].
    q_t, out_t = q.transpose(1, 2), out.transpose(1, 2)
    k_clip, v_clip = clip_kv if clip_kv is not None else (k, v)
    k_c = k_clip.transpose(1, 2).reshape(B, T * L, heads, d).transpose(1, 2)
    v_c = v_clip.transpose(1, 2).reshape(B, T * L, heads, d).transpose(1, 2)

    # 4. Gather masked queries into [B, n_max, heads, d] (zeros where a clip has fewer)
    q_g = q.new_zeros(B, n_max, heads, d).index_put((b_idx, rank), q_t[frame, tok])

    # 5. One fused SDPA call: masked queries against all T*L keys of their clip
    #    [B, heads, n_max, d] x [B, heads, T*L, d] -> [B, heads, n_max, d]
    o_g = F.scaled_dot_product_attention(q_g.transpose(1, 2), k_c, v_c).transpose(1, 2)  # [B, n_max, heads, d]

    # 6. Scatter back: in place without autograd, else out of place (SDPA's backward needs `out`)
    values = o_g[b_idx, rank]  # [K, heads, d]
    if torch.is_grad_enabled() and (values.requires_grad or out.requires_grad):
        out_t = out_t.index_put((frame, tok), values)
    else:
        out_t.index_put_((frame, tok), values)
    return out_t.transpose(1, 2)  # [B*T, heads, L, d]


def layer_grid(num_tokens: int, latent_hw: tuple[int, int], max_levels: int = 8) -> tuple[int, int]:
    """The h x w token grid of a layer with `num_tokens` tokens, for a UNet on a latent_hw grid.

    Each downsampler (stride-2 conv, padding 1) maps n -> ceil(n / 2)."""
    h, w = latent_hw
    for _ in range(max_levels):
        if h * w == num_tokens:
            return h, w
        h, w = math.ceil(h / 2), math.ceil(w / 2)
    raise ValueError(f"{num_tokens} tokens match no downsampled grid of the latent grid {latent_hw}")


def token_mask_for_grid(
    mask: torch.Tensor, grid: tuple[int, int], policy: str = "area", threshold: float = 0.5, latent_hw=None
) -> torch.Tensor:
    """Hole fraction mask [N, H, W] in [0, 1] -> bool token mask [N, h*w] under `policy`."""
    m = mask.float()[:, None]  # [N, 1, H, W]
    if policy == "area":
        tok = F.adaptive_avg_pool2d(m, grid) > threshold
    elif policy == "any":
        tok = F.adaptive_max_pool2d(m, grid) > 0
    elif policy == "bilinear":
        signed = m * 2 - 1  # +1 hole, -1 known
        if latent_hw is not None and tuple(signed.shape[-2:]) != tuple(latent_hw):
            signed = F.interpolate(signed, size=latent_hw, mode="bilinear", align_corners=False)
        if tuple(signed.shape[-2:]) != tuple(grid):
            signed = F.interpolate(signed, size=grid, mode="bilinear", align_corners=False)
        tok = signed > 0
    else:
        raise ConfigError(f"attention policy {policy!r}: choose from {POLICIES}")
    return tok.flatten(1)  # [N, h*w]


class DisocclusionAttention:
    """Mask state shared by the installed processors of one UNet (set it before each UNet call)."""

    def __init__(
        self, policy: str = "area", threshold: float = 0.5, max_tokens_per_frame: int | None = None,
        kv_source: str = "pre_norm",
    ):
        if policy not in POLICIES:
            raise ConfigError(f"attention policy {policy!r}: choose from {POLICIES}")
        if kv_source not in KV_SOURCES:
            raise ConfigError(f"attention kv_source {kv_source!r}: choose from {KV_SOURCES}")
        if not 0.0 <= threshold < 1.0:
            raise ConfigError(f"attention threshold {threshold}: must be in [0, 1)")
        if max_tokens_per_frame is not None and max_tokens_per_frame < 1:
            raise ConfigError(f"attention max_tokens_per_frame {max_tokens_per_frame}: must be >= 1 or null")
        self.policy = policy
        self.threshold = threshold
        self.max_tokens_per_frame = max_tokens_per_frame
        self.kv_source = kv_source
        self.cap_enabled = False  # the refiner turns the cap on in training mode only
        self.clear()

    def clear(self) -> None:
        self.mask = None  # [B*T, H, W] hole fraction, or None
        self.num_frames = None
        self.latent_hw = None
        self._cache: dict[int, torch.Tensor] = {}

    def set_mask(self, mask: torch.Tensor | None, latent_hw: tuple[int, int] | None = None) -> None:
        """mask: [B, T, H, W] or [B, T, 1, H, W], bool or hole fraction in [0, 1] (None: plain
        per-frame attention). latent_hw: the UNet's input grid (default: the mask's own H, W)."""
        self.clear()
        if mask is None:
            return
        if mask.ndim == 5:
            if mask.shape[2] != 1:
                raise ValueError(f"mask must have one channel, got shape {tuple(mask.shape)}")
            mask = mask[:, :, 0]
        if mask.ndim != 4:
            raise ValueError(f"mask must be [B, T, H, W] or [B, T, 1, H, W], got {tuple(mask.shape)}")
        self.num_frames = mask.shape[1]
        self.mask = mask.flatten(0, 1)
        self.latent_hw = tuple(latent_hw) if latent_hw is not None else tuple(mask.shape[-2:])

    def token_mask(self, num_tokens: int) -> torch.Tensor | None:
        """Bool [B*T, L] for a layer with L tokens (cached per L until the mask changes)."""
        if self.mask is None:
            return None
        if num_tokens not in self._cache:
            grid = layer_grid(num_tokens, self.latent_hw)
            tok = token_mask_for_grid(self.mask, grid, self.policy, self.threshold, self.latent_hw)
            if self.cap_enabled and self.max_tokens_per_frame is not None:
                tok = self._cap(tok)
            self._cache[num_tokens] = tok
        return self._cache[num_tokens]

    def _cap(self, tok: torch.Tensor) -> torch.Tensor:
        """Keep a random subset of at most max_tokens_per_frame * T masked tokens per clip."""
        T = self.num_frames
        clip = tok.reshape(-1, T * tok.shape[1])
        cap = self.max_tokens_per_frame * T
        for b in range(clip.shape[0]):
            idx = clip[b].nonzero(as_tuple=True)[0]
            if idx.numel() > cap:
                drop = idx[torch.randperm(idx.numel(), device=idx.device)[cap:]]
                clip[b, drop] = False
        return clip.reshape(tok.shape)


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[N, L, heads*d] -> [N, heads, L, d]"""
    return x.view(x.shape[0], x.shape[1], heads, -1).transpose(1, 2)


def _check_plain_attention(attn, name: str) -> None:
    if attn.spatial_norm is not None or attn.group_norm is not None or attn.norm_cross:
        raise ModelError(f"{name} does not support spatial_norm / group_norm / norm_cross layers")


class DisocclusionAttnProcessor:
    """AttnProcessor2_0 for spatial self-attention, with full clip attention for masked tokens.

    With kv_source "pre_norm" (the released code) the masked tokens' keys and values are projected
    from the transformer block's input before its LayerNorm: `block_input` is recorded by a forward
    pre-hook on the block's norm1 (see install_attention_processors)."""

    def __init__(self, controller: DisocclusionAttention):
        self.controller = controller
        self.block_input: torch.Tensor | None = None  # [B*T, L, C], set by the hook, used once
        self.hook = None

    def record_block_input(self, module, args) -> None:
        self.block_input = args[0]

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        if encoder_hidden_states is not None or attention_mask is not None or hidden_states.ndim != 3:
            raise ModelError("DisocclusionAttnProcessor serves self-attention on [B*T, L, C] tokens only")
        _check_plain_attention(attn, "DisocclusionAttnProcessor")
        residual = hidden_states
        block_input, self.block_input = self.block_input, None
        BT, L, _ = hidden_states.shape  # [B*T, L, C]

        # 1. Projections -> [B*T, heads, L, d]
        query, key, value = (_heads(f(hidden_states), attn.heads) for f in (attn.to_q, attn.to_k, attn.to_v))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        # 2. Keys and values of the full clip attention (only computed when a token is masked)
        token_mask = self.controller.token_mask(L)
        clip_kv = None
        if self.controller.kv_source == "pre_norm" and token_mask is not None and token_mask.any():
            if block_input is None or block_input.shape != hidden_states.shape:
                raise ModelError("DisocclusionAttnProcessor: the block input before norm1 was not recorded "
                                 "(install the processors with install_attention_processors)")
            clip_k, clip_v = _heads(attn.to_k(block_input), attn.heads), _heads(attn.to_v(block_input), attn.heads)
            clip_kv = (attn.norm_k(clip_k) if attn.norm_k is not None else clip_k, clip_v)

        # 3. Attention: per frame, plus full clip attention for masked tokens
        num_frames = self.controller.num_frames or 1
        hidden_states = disocclusion_attention(query, key, value, token_mask, num_frames, clip_kv)

        # 4. Output projection (as AttnProcessor2_0): [B*T, L, C]
        hidden_states = hidden_states.transpose(1, 2).reshape(BT, L, -1).to(query.dtype)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


class FrameContextAttnProcessor:
    """Cross-attention with one context token per frame (M2SVid feeds every left frame's embedding).

    The UNet is called with encoder_hidden_states [B, T, D] (one token per frame); diffusers repeats
    it per frame, so spatial cross-attention sees [B*T, T, D]: each token attends to its own frame's
    embedding, and disoccluded tokens (given a controller) to all T frames' embeddings, as the
    released code's re-run of the block for hole tokens. Temporal cross-attention sees the first
    frame's context and keeps token 0 (the first frame's embedding), as the released code does. A
    context with one token passes through unchanged.
    """

    def __init__(self, mode: str, controller: DisocclusionAttention | None = None):
        if mode not in ("own_frame", "first_frame"):
            raise ValueError(f"mode {mode!r}")
        from diffusers.models.attention_processor import AttnProcessor2_0

        self.mode = mode
        self.controller = controller
        self.inner = AttnProcessor2_0()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        ctx = encoder_hidden_states
        if ctx is None or ctx.shape[1] == 1:
            return self.inner(attn, hidden_states, ctx, attention_mask, temb)
        if self.mode == "first_frame":
            return self.inner(attn, hidden_states, ctx[:, :1], attention_mask, temb)  # [B*h*w, 1, D]
        BT, L, _ = hidden_states.shape
        T = ctx.shape[1]
        own = torch.arange(BT, device=ctx.device) % T  # each row's frame in its clip
        token_mask = self.controller.token_mask(L) if self.controller is not None else None
        if token_mask is None or not token_mask.any():
            return self.inner(attn, hidden_states, ctx[torch.arange(BT, device=ctx.device), own][:, None], attention_mask, temb)
        if attention_mask is not None or attn.residual_connection:
            raise ModelError("FrameContextAttnProcessor: attention masks and residual connections are not supported")
        _check_plain_attention(attn, "FrameContextAttnProcessor")
        # allowed[r, l, t]: own frame for every token, every frame for disoccluded ones: [B*T, 1, L, T]
        allowed = (torch.arange(T, device=ctx.device)[None, None] == own[:, None, None]) | token_mask.to(ctx.device)[:, :, None]
        q = _heads(attn.to_q(hidden_states), attn.heads)  # [B*T, heads, L, d]
        k, v = _heads(attn.to_k(ctx), attn.heads), _heads(attn.to_v(ctx), attn.heads)  # [B*T, heads, T, d]
        if attn.norm_q is not None:
            q, k = attn.norm_q(q), attn.norm_k(k)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[:, None])
        out = attn.to_out[1](attn.to_out[0](out.transpose(1, 2).reshape(BT, L, -1).to(q.dtype)))
        return out / attn.rescale_output_factor


def install_attention_processors(
    unet,
    full_attention: bool = True,
    policy: str = "area",
    threshold: float = 0.5,
    max_tokens_per_frame: int | None = None,
    frame_context: bool = True,
    kv_source: str = "pre_norm",
) -> DisocclusionAttention | None:
    """Install the processors on a UNetSpatioTemporalConditionModel through set_attn_processor.

    full_attention: disocclusion processors on every spatial self-attention layer (returns their
    shared controller; None when off), and disoccluded tokens cross-attend to every frame's context.
    kv_source: keys/values of the full clip attention, "pre_norm" (the block's input before norm1, as
    the released code; a forward pre-hook on norm1 hands it to the processor) or "normed" (the
    per-frame attention's own, no extra projections). frame_context: per-frame cross-attention context.
    """
    controller = DisocclusionAttention(policy, threshold, max_tokens_per_frame, kv_source) if full_attention else None
    processors = {}
    n_spatial = 0
    for name, proc in unet.attn_processors.items():
        if isinstance(proc, DisocclusionAttnProcessor) and proc.hook is not None:  # installed before
            proc.hook.remove()
        if controller is not None and SPATIAL_SELF_ATTN.search(name) and "temporal_transformer_blocks" not in name:
            processors[name] = DisocclusionAttnProcessor(controller)
            if kv_source == "pre_norm":
                norm1 = unet.get_submodule(name[: -len("attn1.processor")] + "norm1")
                processors[name].hook = norm1.register_forward_pre_hook(processors[name].record_block_input)
            n_spatial += 1
        elif frame_context and TEMPORAL_CROSS_ATTN.search(name):
            processors[name] = FrameContextAttnProcessor("first_frame")
        elif frame_context and SPATIAL_CROSS_ATTN.search(name) and "temporal_transformer_blocks" not in name:
            processors[name] = FrameContextAttnProcessor("own_frame", controller)
        else:
            processors[name] = proc
    if controller is not None and n_spatial == 0:
        raise ModelError("the UNet has no spatial self-attention layers (transformer_blocks.N.attn1)")
    unet.set_attn_processor(processors)
    return controller
