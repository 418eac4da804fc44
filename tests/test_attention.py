import copy

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import AttnProcessor2_0

from lightning_m2s.errors import ConfigError
from lightning_m2s.models.attention import (
    DisocclusionAttention, DisocclusionAttnProcessor, disocclusion_attention, install_attention_processors,
    layer_grid, token_mask_for_grid,
)
from lightning_m2s.models.unet import TINY_UNET_CONFIG, build_tiny_unet, widen_conv_in


def dense_reference(q, k, v, m, T, clip_kv=None):
    """Naive dense-mask attention over all B*T*L tokens (block-diagonal per clip); masked queries
    see `clip_kv` (default k, v)."""
    BT, H, L, d = q.shape
    frame = torch.arange(BT).repeat_interleave(L)  # token -> frame
    clip = frame // T
    same_frame = frame[:, None] == frame[None, :]
    same_clip = clip[:, None] == clip[None, :]
    flat = lambda x: x.permute(1, 0, 2, 3).reshape(H, BT * L, d)  # noqa: E731
    qf, kf, vf = flat(q), flat(k), flat(v)
    out = F.scaled_dot_product_attention(qf, kf, vf, attn_mask=same_frame)
    kc, vc = (flat(x) for x in (clip_kv or (k, v)))
    full = F.scaled_dot_product_attention(qf, kc, vc, attn_mask=same_clip)
    out = torch.where(m.reshape(-1)[None, :, None], full, out)
    return out.reshape(H, BT, L, d).permute(1, 0, 2, 3)


def qkv(B, T, H, L, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B * T, L, H, d, generator=g).transpose(1, 2) for _ in range(3)]


@pytest.mark.parametrize("B,T", [(1, 3), (3, 2)])
def test_matches_dense_reference_with_uneven_clips(B, T):
    q, k, v = qkv(B, T, 2, 12, 8)
    m = torch.rand(B * T, 12, generator=torch.Generator().manual_seed(1)) < 0.2
    m[0] = False
    m[-1, :6] = True  # clips have different masked counts
    out = disocclusion_attention(q, k, v, m, T)
    assert out.shape == q.shape
    assert (out - dense_reference(q, k, v, m, T)).abs().max() < 1e-5


def test_masked_queries_attend_to_the_given_clip_keys():
    q, k, v = qkv(2, 3, 2, 10, 8)
    clip_kv = tuple(qkv(2, 3, 2, 10, 8, seed=5)[:2])
    m = torch.rand(6, 10, generator=torch.Generator().manual_seed(2)) < 0.3
    out = disocclusion_attention(q, k, v, m, 3, clip_kv)
    assert (out - dense_reference(q, k, v, m, 3, clip_kv)).abs().max() < 1e-5
    # unmasked queries keep their per-frame attention over k, v
    assert torch.allclose(out.transpose(1, 2)[~m], disocclusion_attention(q, k, v, m, 3).transpose(1, 2)[~m])


def test_empty_mask_is_stock_attention():
    q, k, v = qkv(2, 3, 2, 10, 8)
    stock = F.scaled_dot_product_attention(q, k, v)
    assert torch.equal(disocclusion_attention(q, k, v, None, 3), stock)
    assert torch.equal(disocclusion_attention(q, k, v, torch.zeros(6, 10, dtype=torch.bool), 3), stock)


def test_gradients_reach_qkv_and_match_reference():
    q, k, v = (x.detach().requires_grad_() for x in qkv(2, 2, 2, 9, 4))
    m = torch.zeros(4, 9, dtype=torch.bool)
    m[1, 2:5] = True
    m[2, 0] = True
    disocclusion_attention(q, k, v, m, 2).square().sum().backward()
    grads = [x.grad.clone() for x in (q, k, v)]
    for x in (q, k, v):
        x.grad = None
    dense_reference(q, k, v, m, 2).square().sum().backward()
    for g, x in zip(grads, (q, k, v)):
        assert g.abs().sum() > 0 and torch.allclose(g, x.grad, atol=1e-5)
    # keys of OTHER frames receive gradient only through masked queries
    assert grads[1][0].abs().sum() > 0


def test_layer_grid_and_policies():
    assert layer_grid(64, (8, 8)) == (8, 8) and layer_grid(16, (8, 8)) == (4, 4)
    assert layer_grid(6, (5, 3)) == (3, 2)  # ceil(5/2) x ceil(3/2)
    with pytest.raises(ValueError):
        layer_grid(7, (8, 8))
    mask = torch.zeros(1, 8, 8)
    mask[0, :, 0:3] = 1  # 3 of the 4 columns of each left 4x4 cell are hole
    area = token_mask_for_grid(mask, (2, 2), "area", 0.5).reshape(2, 2)
    anyp = token_mask_for_grid(mask, (2, 2), "any").reshape(2, 2)
    assert area.tolist() == [[True, False], [True, False]]  # 3/4 of the cell is hole
    mask[0, :, 0:3] = 0
    mask[0, :, 3] = 1  # 1/4 of the left cells
    assert not token_mask_for_grid(mask, (2, 2), "area", 0.5).any()
    assert token_mask_for_grid(mask, (2, 2), "any").reshape(2, 2).tolist() == [[True, False], [True, False]]
    assert anyp.sum() == 2
    with pytest.raises(ConfigError):
        DisocclusionAttention(policy="nearest")


def test_training_cap_limits_tokens_per_clip():
    ctrl = DisocclusionAttention(max_tokens_per_frame=2)
    ctrl.cap_enabled = True
    ctrl.set_mask(torch.ones(2, 3, 4, 4))
    tok = ctrl.token_mask(16)
    assert tok.reshape(2, -1).sum(1).tolist() == [6, 6]
    assert ctrl.token_mask(16) is tok  # cached: checkpoint recomputation sees the same subset


IN_CHANNELS = 3 * TINY_UNET_CONFIG["out_channels"] + 1  # the tiny UNet widened for the left view


def tiny_unet(full_attention=True):
    unet = widen_conv_in(build_tiny_unet(seed=0), True)
    ctrl = install_attention_processors(unet, full_attention=full_attention)
    return unet, ctrl


def run(unet, x, ctx):
    return unet(x, torch.tensor([1.0]), ctx, torch.tensor([[5.0, 127.0, 0.02]]), return_dict=False)[0]


def test_installed_only_on_spatial_self_attention():
    unet, ctrl = tiny_unet()
    procs = unet.attn_processors
    spatial = [n for n, p in procs.items() if isinstance(p, DisocclusionAttnProcessor)]
    assert spatial and all(".transformer_blocks." in n and n.endswith("attn1.processor") for n in spatial)
    assert all("temporal" not in n for n in spatial)
    assert all(not isinstance(p, DisocclusionAttnProcessor) for n, p in procs.items() if "temporal" in n)


def test_unet_output_changes_only_with_a_mask():
    torch.manual_seed(0)
    x, ctx = torch.randn(1, 3, IN_CHANNELS, 8, 8), torch.randn(1, 3, 64)
    unet, ctrl = tiny_unet()
    stock, _ = tiny_unet(full_attention=False)
    with torch.no_grad():
        ref = run(stock, x, ctx)
        ctrl.set_mask(torch.zeros(1, 3, 8, 8))
        assert torch.allclose(run(unet, x, ctx), ref, atol=1e-6)
        mask = torch.zeros(1, 3, 8, 8)
        mask[:, 1, :, 2:5] = 1
        ctrl.set_mask(mask)
        changed = run(unet, x, ctx)
    assert (changed - ref).abs().max() > 1e-4


def test_stock_processor_equivalence_single_layer():
    unet, ctrl = tiny_unet()
    name, proc = next((n, p) for n, p in unet.attn_processors.items() if isinstance(p, DisocclusionAttnProcessor))
    module = unet.get_submodule(name.rsplit(".processor", 1)[0])
    h = torch.randn(4, 16, module.to_q.in_features)
    ctrl.set_mask(None)
    assert torch.allclose(proc(module, h), AttnProcessor2_0()(module, h), atol=1e-6)


def test_gradient_checkpointing_same_gradients():
    torch.manual_seed(0)
    x, ctx = torch.randn(1, 3, IN_CHANNELS, 8, 8), torch.randn(1, 3, 64)
    mask = torch.zeros(1, 3, 8, 8)
    mask[:, :, :, 3:6] = 1
    grads = []
    for ckpt in (False, True):
        unet, ctrl = tiny_unet()
        if ckpt:
            unet.enable_gradient_checkpointing()
        ctrl.set_mask(mask)
        run(unet, x, ctx).square().mean().backward()
        grads.append(unet.conv_in.weight.grad.clone())
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def released_block_reference(block, x, ctx, token_mask, T):
    """The released code's algorithm with stock processors: the block per frame (own frame's context
    token), then per clip the hole tokens run through the block again, attending to all tokens of the
    clip taken before norm1, and cross-attending to all T context tokens; their outputs overwrite."""
    ref = copy.deepcopy(block)
    ref.attn1.set_processor(AttnProcessor2_0())
    ref.attn2.set_processor(AttnProcessor2_0())
    BT, L, C = x.shape
    rows = torch.arange(BT)
    y = ref(x, encoder_hidden_states=ctx[rows, rows % T][:, None]).clone()
    for b in range(BT // T):
        xs = x[b * T:(b + 1) * T].reshape(1, T * L, C)
        hole = token_mask[b * T:(b + 1) * T].reshape(-1)
        h = xs[:, hole]
        h = h + ref.attn1(ref.norm1(h), encoder_hidden_states=xs)
        h = h + ref.attn2(ref.norm2(h), encoder_hidden_states=ctx[b * T:b * T + 1])
        h = h + ref.ff(ref.norm3(h))
        y.view(-1, T * L, C)[b, hole] = h[0]
    return y


def test_spatial_block_equals_the_released_hole_rerun():
    unet, ctrl = tiny_unet()
    name = next(n for n, p in unet.attn_processors.items() if isinstance(p, DisocclusionAttnProcessor))
    block = unet.get_submodule(name[: -len(".attn1.processor")])
    B, T, h, w = 2, 3, 4, 4
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B * T, h * w, block.norm1.normalized_shape[0], generator=g)
    ctx = torch.randn(B, T, 64, generator=g).repeat_interleave(T, dim=0)  # [B*T, T, D] as the UNet passes it
    mask = torch.rand(B, T, h, w, generator=g) < 0.3
    ctrl.set_mask(mask.float(), latent_hw=(h, w))
    token_mask = ctrl.token_mask(h * w)
    assert token_mask.any() and not token_mask.all()
    with torch.no_grad():
        ours = block(x, encoder_hidden_states=ctx)
        ref = released_block_reference(block, x, ctx, token_mask, T)
    assert (ours - ref).abs().max() < 1e-5
    # the cheaper "normed" keys differ from the released ones
    install_attention_processors(unet, kv_source="normed").set_mask(mask.float(), latent_hw=(h, w))
    with torch.no_grad():
        assert (block(x, encoder_hidden_states=ctx) - ref).abs().max() > 1e-4


def test_reinstalling_leaves_one_hook_per_block():
    unet, _ = tiny_unet()
    install_attention_processors(unet)
    install_attention_processors(unet, full_attention=False)
    install_attention_processors(unet)
    name = next(n for n, p in unet.attn_processors.items() if isinstance(p, DisocclusionAttnProcessor))
    norm1 = unet.get_submodule(name[: -len("attn1.processor")] + "norm1")
    assert len(norm1._forward_pre_hooks) == 1
    with pytest.raises(ConfigError, match="kv_source"):
        install_attention_processors(unet, kv_source="raw")
