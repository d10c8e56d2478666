"""The multiway block against a reference written out by hand (LayerNorm, one qkv projection split
into heads, softmax attention, residuals, the expert chosen by position): the whole sequence, the
query slices the last block computes, the fused pass over an image memory, and the key/value
cache of incremental decoding."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from vlp.models.config import load_config
from vlp.models.multiway import KVCache, MultiwayBlock

WIDTH, HEADS = 8, 2
EPS = 0.3  # far from LayerNorm's default, so a norm built without it shows


@pytest.fixture(scope="module")
def block() -> MultiwayBlock:
    torch.manual_seed(0)
    config = load_config("tiny", vocab_size=20, width=WIDTH, heads=HEADS, depth=2,
                         fusion_layers=1, dropout=0.0, layer_norm_eps=EPS)
    block = MultiwayBlock(config, vl_ffn=True).eval()
    with torch.no_grad():  # LayerNorm affine parameters away from (1, 0), so each one counts
        for norm in (block.norm, block.ffn_v.norm, block.ffn_l.norm, block.ffn_vl.norm):
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.uniform_(-0.5, 0.5)
    return block


def ffn(expert, x):
    return expert.fc2(F.gelu(expert.fc1(F.layer_norm(x, (WIDTH,), expert.norm.weight,
                                                     expert.norm.bias, EPS))))


def attend(block, x, keys_from, mask=None):
    """Softmax attention of LN(x)'s queries over the keys and values of LN(keys_from)
    (B, Tk, C); `mask` (B, Tq, Tk) True where a key is seen."""
    norm = lambda t: F.layer_norm(t, (WIDTH,), block.norm.weight, block.norm.bias, EPS)
    w, b = block.attn.qkv.weight, block.attn.qkv.bias
    q = norm(x) @ w[:WIDTH].T + b[:WIDTH]
    k = norm(keys_from) @ w[WIDTH:2 * WIDTH].T + b[WIDTH:2 * WIDTH]
    v = norm(keys_from) @ w[2 * WIDTH:].T + b[2 * WIDTH:]
    d = WIDTH // HEADS
    heads = []
    for h in range(HEADS):
        part = slice(h * d, (h + 1) * d)
        scores = q[..., part] @ k[..., part].transpose(1, 2) / math.sqrt(d)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        heads.append(scores.softmax(-1) @ v[..., part])
    return block.attn.proj(torch.cat(heads, dim=-1))


def reference(block, x, split, mask=None):
    """x + Attn(LN(x)), then + the V-FFN on positions < split and the L-FFN on the others."""
    y = x + attend(block, x, x, mask)
    return y + torch.cat([ffn(block.ffn_v, y[:, :split]), ffn(block.ffn_l, y[:, split:])], dim=1)


@torch.no_grad()
@pytest.mark.parametrize("length, split", [(7, 0), (7, 3), (7, 7), (7, 9), (20, 12)])
def test_a_block_is_pre_norm_attention_then_the_expert_of_each_position(block, length, split):
    """(20, 12): a sequence longer than the model is wide, so the boundary is checked against
    the sequence's length, not the width."""
    torch.manual_seed(1)
    x = torch.randn(2, length, WIDTH)
    expected = reference(block, x, min(split, length))
    assert torch.allclose(block(x, split), expected, atol=1e-5)
    padding = torch.ones(2, length, dtype=torch.bool)
    padding[1, -2:] = False
    masked = reference(block, x, min(split, length), padding[:, None, :].expand(2, length, length))
    assert torch.allclose(block(x, split, key_padding_mask=padding), masked, atol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("queries", [slice(None, 1), slice(None, 4), slice(2, 5), slice(4, None),
                                     slice(2, 22)])
def test_query_slices_are_the_rows_of_the_whole_pass(block, queries):
    """Experts are chosen by the position in the whole sequence (split 17 of 24 tokens: wider than
    the model, so the boundary cannot be clamped by the wrong size)."""
    torch.manual_seed(2)
    x = torch.randn(2, 24, WIDTH)
    whole = block(x, 17)
    assert torch.allclose(block(x, 17, queries=queries), whole[:, queries], atol=1e-5)
    assert torch.allclose(block(x, 3, queries=queries), block(x, 3)[:, queries], atol=1e-5)


@torch.no_grad()
def test_the_fused_pass_attends_over_the_image_memory_and_the_text_then_the_vl_expert(block):
    torch.manual_seed(3)
    patches, text = torch.randn(2, 5, WIDTH), torch.randn(2, 4, WIDTH)
    memory = block.memory(patches)
    y = text + attend(block, text, torch.cat([patches, text], dim=1))
    expected = y + ffn(block.ffn_vl, y)
    assert torch.allclose(block.fused(text, memory, None), expected, atol=1e-5)
    assert torch.allclose(block.fused(text, memory, None, queries=slice(1, 3)),
                          expected[:, 1:3], atol=1e-5)
    keys = torch.tensor([[True] * 9, [True, True, False, True, True, True, True, True, False]])
    y = text + attend(block, text, torch.cat([patches, text], dim=1),
                      keys[:, None, :].expand(2, 4, 9))
    assert torch.allclose(block.fused(text, memory, keys), y + ffn(block.ffn_vl, y), atol=1e-5)


@torch.no_grad()
def test_a_cached_fused_pass_continues_the_tokens_before_it(block):
    torch.manual_seed(4)
    patches, text = torch.randn(1, 5, WIDTH), torch.randn(1, 4, WIDTH)
    memory = block.memory(patches)
    causal = torch.ones(4, 9, dtype=torch.bool)
    causal[:, 5:] = torch.tril(torch.ones(4, 4, dtype=torch.bool))
    whole = block.fused(text, memory, None, attn_mask=causal[None])
    cache = KVCache(4)
    steps = [block.fused(text[:, t:t + 1], memory, None, cache=cache) for t in range(4)]
    assert torch.allclose(torch.cat(steps, dim=1), whole, atol=1e-5)
    assert cache.length == 4


def test_the_cache_holds_up_to_its_capacity_in_place():
    cache = KVCache(3)
    k1, v1 = torch.ones(2, 1, 2, 4), 2 * torch.ones(2, 1, 2, 4)
    k, v = cache.append(k1, v1)
    assert torch.equal(k, k1) and torch.equal(v, v1) and cache.k.shape == (2, 1, 3, 4)
    storage = cache.k.data_ptr()
    k, v = cache.append(3 * torch.ones(2, 1, 1, 4), 4 * torch.ones(2, 1, 1, 4))  # exactly full
    assert cache.length == 3 and cache.k.data_ptr() == storage
    assert k[:, :, 2].eq(3).all() and v[:, :, :2].eq(2).all() and v[:, :, 2].eq(4).all()
    with pytest.raises(ValueError) as error:
        cache.append(k1[:, :, :1], v1[:, :, :1])
    assert str(error.value) == "KV cache holds 3 positions, 4 were asked for"


def test_selecting_rows_reorders_and_repeats_both_keys_and_values():
    cache = KVCache(2)
    cache.select(torch.tensor([0]))  # nothing cached yet: nothing to do
    k = torch.arange(3.0).view(3, 1, 1, 1).expand(3, 1, 1, 2)
    cache.append(k, -k)
    cache.select(torch.tensor([2, 2, 0]))
    assert cache.k[:, 0, 0, 0].tolist() == [2.0, 2.0, 0.0]
    assert cache.v[:, 0, 0, 0].tolist() == [-2.0, -2.0, -0.0]
