"""The fused SDPA backend agrees with the plain matmul-softmax reference, padding and general
(causal, sequence-to-sequence) masks included."""
import pytest
import torch
import torch.nn.functional as F

from vlp.models.attention import attention


def qkv_and_mask(dtype, B=3, heads=2, T=9, head_dim=16):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, heads, T, head_dim, generator=g).to(dtype).requires_grad_()
               for _ in range(3))
    lengths = torch.tensor([T, 5, 1])  # full, padded, only the first token real
    mask = torch.arange(T) < lengths[:, None]  # (B, T), True = real token
    return q, k, v, mask


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_backends_agree_forward_and_backward(dtype, tol):
    q, k, v, mask = qkv_and_mask(dtype)
    out_grad = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    results = []
    for backend in ("sdpa", "reference"):
        out = attention(q, k, v, mask, backend)
        grads = torch.autograd.grad(out, (q, k, v), out_grad)
        results.append((out, *grads))
    for fused, plain in zip(*results):
        torch.testing.assert_close(fused.float(), plain.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("backend", ["sdpa", "reference"])
def test_masked_keys_have_no_influence(backend):
    q, k, v, mask = qkv_and_mask(torch.float32)
    out = attention(q, k, v, mask, backend)
    padding = ~mask[:, None, :, None]  # (B, 1, T, 1)
    k2 = torch.where(padding, torch.randn_like(k) * 100, k)
    v2 = torch.where(padding, torch.randn_like(v) * 100, v)
    torch.testing.assert_close(attention(q, k2, v2, mask, backend), out, atol=1e-5, rtol=1e-5)
    grad_k, grad_v = torch.autograd.grad(out.sum(), (k, v))
    assert grad_k.masked_select(padding).abs().max() == 0
    assert grad_v.masked_select(padding).abs().max() == 0


def test_no_mask_attends_everywhere():
    q, k, v, _ = qkv_and_mask(torch.float32)
    torch.testing.assert_close(attention(q, k, v), attention(q, k, v, backend="reference"),
                               atol=1e-5, rtol=1e-5)


def test_unknown_backend_is_an_error():
    q, k, v, _ = qkv_and_mask(torch.float32)
    with pytest.raises(ValueError, match="flash3"):
        attention(q, k, v, backend="flash3")


def general_mask(T=9):
    """A causal mask for rows 0-1 and a sequence-to-sequence one (3 'image' keys) for row 2."""
    from vlp.models.attention import causal_mask, seq2seq_mask

    causal = causal_mask(torch.ones(2, T, dtype=torch.bool))
    seq2seq = seq2seq_mask(3, (torch.arange(T - 3) < 4)[None])  # 4 real text tokens, 2 padding
    return torch.cat([causal, seq2seq])  # (3, T, T)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_backends_agree_with_a_general_mask(dtype, tol):
    q, k, v, padding = qkv_and_mask(dtype)
    out_grad = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    for key_padding in (None, padding):
        results = []
        for backend in ("sdpa", "reference"):
            out = attention(q, k, v, key_padding, backend, attn_mask=general_mask())
            results.append((out, *torch.autograd.grad(out, (q, k, v), out_grad)))
        for fused, plain in zip(*results):
            torch.testing.assert_close(fused.float(), plain.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("backend", ["sdpa", "reference"])
def test_a_general_mask_hides_exactly_the_keys_it_excludes(backend):
    q, k, v, _ = qkv_and_mask(torch.float32)
    mask = general_mask()
    out = attention(q, k, v, backend=backend, attn_mask=mask)
    # Query i of row b, alone, over only the keys it may attend: the same result.
    for b in range(3):
        for i in range(9):
            keys = mask[b, i]
            alone = attention(q[b:b + 1, :, i:i + 1], k[b:b + 1, :, keys], v[b:b + 1, :, keys],
                              backend=backend)
            torch.testing.assert_close(out[b:b + 1, :, i:i + 1], alone, atol=1e-5, rtol=1e-5)


def test_key_padding_and_a_general_mask_combine():
    q, k, v, padding = qkv_and_mask(torch.float32)
    mask = general_mask()
    both = attention(q, k, v, padding, attn_mask=mask)
    torch.testing.assert_close(both, attention(q, k, v, attn_mask=mask & padding[:, None, :]))


@pytest.mark.parametrize("backend", ["sdpa", "reference"])
def test_is_causal_is_the_causal_mask_without_a_mask_tensor(backend):
    from vlp.models.attention import causal_mask

    q, k, v, _ = qkv_and_mask(torch.float32)
    causal = causal_mask(torch.ones(q.size(0), q.size(2), dtype=torch.bool))
    out_grad = torch.randn(q.shape, generator=torch.Generator().manual_seed(1))
    results = []
    for kwargs in ({"is_causal": True}, {"attn_mask": causal}):
        out = attention(q, k, v, backend=backend, **kwargs)
        results.append((out, *torch.autograd.grad(out, (q, k, v), out_grad)))
    for flag, mask in zip(*results):
        torch.testing.assert_close(flag, mask, atol=1e-6, rtol=1e-6)
    message = "^is_causal takes no mask and as many queries as keys$"
    with pytest.raises(ValueError, match=message):
        attention(q, k, v, backend=backend, attn_mask=causal, is_causal=True)
    with pytest.raises(ValueError, match=message):
        attention(q[:, :, :4], k, v, backend=backend, is_causal=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_on_the_cpu_is_attended_in_fp32_and_cast_back(dtype):
    """Exactly fp32 SDPA of the upcast inputs, cast back, also under autocast: the half-precision
    kernel and autocast's bf16 both round differently."""
    q, k, v, padding = qkv_and_mask(dtype)
    q32, k32, v32 = q.float(), k.float(), v.float()
    cases = [({}, {}), ({"key_padding_mask": padding}, {"attn_mask": padding[:, None, None, :]}),
             ({"is_causal": True}, {"is_causal": True})]
    for ours, torchs in cases:
        want = F.scaled_dot_product_attention(q32, k32, v32, **torchs).to(dtype)
        for autocast in (False, True):
            with torch.autocast("cpu", enabled=autocast):
                out = attention(q, k, v, **ours)
            assert out.dtype == dtype and torch.equal(out, want), (ours, autocast)


def test_fp32_inputs_under_autocast_are_left_to_autocast():
    q, k, v, _ = qkv_and_mask(torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, want = attention(q, k, v), F.scaled_dot_product_attention(q, k, v)
    assert out.dtype == torch.bfloat16 and torch.equal(out, want)


def test_masks_are_built_on_the_inputs_device():
    from vlp.models.attention import causal_mask, seq2seq_mask

    text_mask = torch.ones(2, 5, dtype=torch.bool, device="meta")
    assert causal_mask(text_mask).device.type == "meta"
    assert seq2seq_mask(3, text_mask).device.type == "meta"
    q = torch.ones(2, 2, 5, 8, device="meta")
    assert attention(q, q, q, backend="reference", is_causal=True).device.type == "meta"
