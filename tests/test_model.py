"""The unified model: configs, shapes, padding, expert routing, gradients, bf16, FLOPs."""
import json

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from vlp.models import LossWeights, ModelConfig, UnifiedModel, flops_per_sample, load_config
from vlp.models.model import sincos_2d
from vlp.models.multiway import MultiwayBlock
from vlp.pipeline.data.transforms import MaskingSpec, mask_tokens
from vlp.pipeline.distributed import fast_bf16

VOCAB, CLS, MASK = 100, 1, 3  # ids 0-3 are special: [PAD] [CLS] [SEP] [MASK]


def small_config(**overrides) -> ModelConfig:
    """`tiny` at a third of its width: the same structure, fast enough for many small tests."""
    return load_config("tiny", **{"vocab_size": VOCAB, "width": 64, "heads": 2, **overrides})


def make_batch(config: ModelConfig, B: int = 4, T: int = 12, seed: int = 0) -> dict:
    """Random images and captions of varied length ([CLS] first), MLM-masked as the loader does."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(B, 3, config.image_size, config.image_size, generator=g)
    ids = torch.randint(4, config.vocab_size, (B, T), generator=g)
    ids[:, 0] = CLS
    lengths = torch.randint(3, T + 1, (B,), generator=g)
    mask = torch.arange(T) < lengths[:, None]
    ids[~mask] = 0
    spec = MaskingSpec(mask_token_id=MASK, vocab_size=config.vocab_size, special_ids=(0, 1, 2, 3))
    mlm_ids, mlm_labels = mask_tokens(ids, mask, spec, g)
    return dict(images=images, text_ids=ids, text_mask=mask, mlm_ids=mlm_ids, mlm_labels=mlm_labels)


# ---- config -----------------------------------------------------------------------------------

def test_named_sizes():
    base = load_config("base")
    assert (base.image_size, base.patch_size, base.width, base.depth) == (224, 16, 768, 12)
    assert (base.heads, base.mlp_hidden, base.fusion_layers) == (12, 3072, 2)
    assert (base.max_text_len, base.vocab_size) == (40, 30522)
    large = load_config("large")
    assert (large.width, large.depth, large.heads, large.fusion_layers) == (1024, 24, 16, 3)
    tiny = load_config("tiny")
    assert (tiny.image_size, tiny.patch_size, tiny.fusion_layers) == (64, 8, 2)
    assert tiny.max_text_len == 32
    with pytest.raises(ValueError, match="vocab_size"):
        UnifiedModel(tiny)  # the tokenizer decides: load_config("tiny", vocab_size=...)
    for name in ("small", "base", "large"):
        assert ModelConfig.from_dict(load_config(name).to_dict()) == load_config(name)


def test_unknown_config_key_is_an_error(tmp_path):
    with pytest.raises(ValueError, match=r"widht.*valid keys.*'width'"):
        load_config("tiny", widht=128)
    path = tmp_path / "custom.json"
    path.write_text(json.dumps({**load_config("base").to_dict(), "num_layers": 6}))
    with pytest.raises(ValueError, match=r"num_layers.*valid keys.*'depth'"):
        load_config(path)
    with pytest.raises(ValueError, match="huge"):
        load_config("huge")
    with pytest.raises(ValueError, match="not divisible"):
        load_config("base", heads=5)


@pytest.mark.parametrize("size, most", [("image_size", 8192), ("width", 65536), ("depth", 1024),
                                        ("max_text_len", 65536), ("vocab_size", 1 << 22)])
def test_sizes_no_device_holds_are_refused_before_anything_is_built(size, most):
    """image_size 262144 passed `vlp train --dry-run`, then failed to allocate on every rank."""
    fits = {"image_size": {"patch_size": 8}, "width": {"heads": 1}}.get(size, {})
    assert getattr(load_config("tiny", **fits, **{size: most}), size) == most
    with pytest.raises(ValueError, match=rf"^{size} must be at most {most}, got {most * 2}$"):
        load_config("tiny", **fits, **{size: most * 2})


# ---- shapes, masks, routing -------------------------------------------------------------------

def test_public_methods_shapes():
    config = small_config()
    model = UnifiedModel(config).eval()
    batch = make_batch(config, B=3, T=10)
    images, ids, mask = batch["images"], batch["text_ids"], batch["text_mask"]
    Ti = 1 + config.num_patches
    with torch.no_grad():
        image_states, text_states = model.image_states(images), model.text_states(ids, mask)
        assert image_states.shape == (3, Ti, config.width)
        assert text_states.shape == (3, 10, config.width)
        memory = model.image_memory(image_states)
        head_dim = config.width // config.heads
        assert memory.cls.shape == (3, 1, config.width)
        assert [tuple(t.shape) for kv in memory.kv for t in kv] == \
            [(3, config.heads, config.num_patches, head_dim)] * 2 * config.fusion_layers
        assert model.fuse(memory, text_states, mask).shape == (3, 1 + 10, config.width)
        for emb in (model.encode_image(images), model.encode_text(ids, mask)):
            assert emb.shape == (3, config.embed_dim)
            torch.testing.assert_close(emb.norm(dim=-1), torch.ones(3))
        assert model.itm_logits(images, ids, mask).shape == (3, 2)
        with pytest.raises(RuntimeError, match=r"^no VQA head: call "
                                               r"model\.attach_vqa_head\(num_answers\) first$"):
            model.vqa_logits(images, ids, mask)
        model.attach_vqa_head(7)
        assert model.vqa_logits(images, ids, mask).shape == (3, 7)


def test_more_padding_gives_the_same_outputs():
    config = small_config()
    model = UnifiedModel(config).eval()
    batch = make_batch(config, B=3, T=12)
    images, ids, mask = batch["images"], batch["text_ids"], batch["text_mask"]
    # The same captions padded to max_text_len, with junk ids under the padding.
    long_ids = torch.randint(4, VOCAB, (3, config.max_text_len))
    long_ids[:, :12] = ids
    long_mask = torch.zeros(3, config.max_text_len, dtype=torch.bool)
    long_mask[:, :12] = mask
    with torch.no_grad():
        torch.testing.assert_close(model.encode_text(long_ids, long_mask),
                                   model.encode_text(ids, mask))
        torch.testing.assert_close(model.itm_logits(images, long_ids, long_mask),
                                   model.itm_logits(images, ids, mask))
        memory = model.image_memory(model.image_states(images))
        fused = model.fuse(memory, model.text_states(ids, mask), mask)
        fused_long = model.fuse(memory, model.text_states(long_ids, long_mask), long_mask)
    torch.testing.assert_close(fused_long[:, :13][:, 1:][mask], fused[:, 1:][mask])
    torch.testing.assert_close(fused_long[:, 0], fused[:, 0])  # the pooled image CLS


@pytest.mark.parametrize("vl_ffn, split, queries", [
    (False, 5, slice(3, 7)),  # mixed bottom block, a window across the boundary
    (True, 8, slice(0, 1)),  # image only (ITC)
    (True, 0, slice(0, 1)),  # text only (ITC)
])
def test_queries_compute_a_slice_of_the_full_block(vl_ffn, split, queries):
    torch.manual_seed(0)
    block = MultiwayBlock(small_config(), vl_ffn=vl_ffn).eval()
    x = torch.randn(2, 8, 64)
    mask = torch.ones(2, 8, dtype=torch.bool)
    mask[1, 7] = False
    with torch.no_grad():
        torch.testing.assert_close(block(x, split, mask, queries=queries),
                                   block(x, split, mask)[:, queries])


@pytest.mark.parametrize("vl_ffn, split, changed_by", [
    (False, 5, {"ffn_v": "image", "ffn_l": "text"}),  # bottom block, mixed: routed by split
    (True, 8, {"ffn_v": "all", "ffn_l": None, "ffn_vl": None}),  # top block, image only
    (True, 0, {"ffn_v": None, "ffn_l": "all", "ffn_vl": None}),  # top block, text only
])
def test_tokens_are_routed_to_their_expert(vl_ffn, split, changed_by):
    torch.manual_seed(0)
    block = MultiwayBlock(small_config(), vl_ffn=vl_ffn)
    x = torch.randn(2, 8, 64)
    before = block(x, split)
    tokens = {"image": slice(0, split), "text": slice(split, 8), "all": slice(0, 8)}
    for expert, part in changed_by.items():
        with torch.no_grad():
            getattr(block, expert).fc2.bias.add_(1.0)
            after = block(x, split)
            getattr(block, expert).fc2.bias.sub_(1.0)
        changed = (after - before).abs().amax(dim=(0, 2)) > 0.5  # per token
        expected = torch.zeros(8, dtype=torch.bool)
        if part is not None:
            expected[tokens[part]] = True
        assert torch.equal(changed, expected), expert


def test_fused_block_is_text_attending_over_image_then_text_with_the_vl_ffn():
    """The fused block equals the textbook computation: the fused tokens' queries over
    keys/values of [image patches; fused tokens] (the patches' from the same shared qkv), out
    proj, then the VL-FFN only; the patch tokens themselves are not updated."""
    torch.manual_seed(0)
    config = small_config(attention_backend="reference")
    block = MultiwayBlock(config, vl_ffn=True).eval()
    image, text = torch.randn(2, 6, 64), torch.randn(2, 4, 64)
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[1, 9] = False  # the second caption's last token is padding
    with torch.no_grad():
        got = block.fused(text, block.memory(image), mask)
        H, d = config.heads, 64 // config.heads
        qkv = block.attn.qkv(block.norm(torch.cat([image, text], dim=1)))
        q, k, v = qkv.view(2, 10, 3, H, d).permute(2, 0, 3, 1, 4)
        scores = (q[:, :, 6:] @ k.transpose(-2, -1)) / d**0.5  # text rows only
        scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
        attended = (scores.softmax(-1) @ v).transpose(1, 2).reshape(2, 4, 64)
        expected = text + block.attn.proj(attended)
        expected = expected + block.ffn_vl(expected)
        torch.testing.assert_close(got, expected)
        torch.testing.assert_close(block.fused(text, block.memory(image), mask,
                                               queries=slice(0, 1)), got[:, :1])


# ---- training ---------------------------------------------------------------------------------

def test_pretraining_step_reaches_every_parameter():
    config = small_config()
    model = UnifiedModel(config)
    out = model(**make_batch(config, B=6))
    assert set(out) == {"loss", "itc_loss", "itm_loss", "mlm_loss",
                        "itc_acc", "itm_acc", "mlm_acc", "temperature"}
    assert all(v.dim() == 0 and torch.isfinite(v) for v in out.values())
    torch.testing.assert_close(out["loss"], out["itc_loss"] + out["itm_loss"] + out["mlm_loss"])
    out["loss"].backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()]
    assert no_grad == []


def test_vqa_step_trains_the_head():
    config = small_config()
    model = UnifiedModel(config, LossWeights(itc=0, itm=0, mlm=0))
    model.attach_vqa_head(5)
    batch = make_batch(config, B=4)
    targets = torch.zeros(4, 5)
    targets[:, 2] = 1.0
    targets[0, 3] = 0.3
    out = model(batch["images"], batch["text_ids"], batch["text_mask"], vqa_targets=targets)
    assert set(out) == {"loss", "vqa_loss"}
    out["loss"].backward()
    assert all(p.grad is not None and p.grad.any() for p in model.vqa_head.parameters())
    assert model.logit_scale.grad is None and model.itm_head.weight.grad is None  # ITC, ITM off


def test_late_fusion_vqa_reads_only_the_unimodal_states():
    """The late-fusion baseline: no fused pass at all, so the VL-FFN gets no gradient, and the
    answer depends on the image only through the image's own CLS state."""
    config = small_config()
    model = UnifiedModel(config, LossWeights(itc=0, itm=0, mlm=0))
    model.attach_vqa_head(5, fusion="late")
    assert model.vqa_head[0].in_features == 2 * config.width
    batch = make_batch(config, B=4)
    out = model(batch["images"], batch["text_ids"], batch["text_mask"],
                vqa_targets=torch.full((4, 5), 0.2))
    out["loss"].backward()
    vl_ffn = [p for n, p in model.named_parameters() if ".ffn_vl." in n]
    assert vl_ffn and all(p.grad is None for p in vl_ffn)
    assert all(p.grad is not None for p in model.vqa_head.parameters())
    with pytest.raises(ValueError, match="fusion"):
        model.attach_vqa_head(5, fusion="early")


def test_zero_weight_skips_the_objective_and_mlm_needs_its_inputs():
    config = small_config()
    batch = make_batch(config)
    itc_only = UnifiedModel(config, LossWeights(itm=0, mlm=0))
    out = itc_only(batch["images"], batch["text_ids"], batch["text_mask"])
    assert set(out) == {"loss", "itc_loss", "itc_acc", "temperature"}
    full = UnifiedModel(config)
    for given in ({}, {"mlm_ids": batch["mlm_ids"]}, {"mlm_labels": batch["mlm_labels"]}):
        with pytest.raises(ValueError, match=r"^the MLM weight is nonzero: pass mlm_ids and "
                                             r"mlm_labels, or build the model with"):
            full(batch["images"], batch["text_ids"], batch["text_mask"], **given)
    vqa_only = UnifiedModel(config, LossWeights(itc=0, itm=0, mlm=0))
    with pytest.raises(ValueError, match=r"^no objective enabled by LossWeights\(itc=0, itm=0, "
                                         r"mlm=0, vqa=1.0, lm=0.0\) for these inputs$"):
        vqa_only(batch["images"], batch["text_ids"], batch["text_mask"])  # no VQA targets


def test_batch_of_one_trains_itm_on_its_positive():
    config = small_config()
    model = UnifiedModel(config).eval()
    batch = make_batch(config, B=1)
    with torch.no_grad():
        out = model(**batch)
        match = model.itm_logits(batch["images"], batch["text_ids"], batch["text_mask"])
    assert torch.isfinite(out["loss"]) and out["itc_loss"] == 0  # one pair: nothing to contrast
    # no negative: the pair itself is not drawn as its own negative
    torch.testing.assert_close(out["itm_loss"], F.cross_entropy(match, torch.ones(1).long()))


def test_bf16_autocast_on_cpu():
    config = small_config()
    model = UnifiedModel(config)
    batch = make_batch(config)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(**batch)
        emb = model.encode_image(batch["images"])
    assert torch.isfinite(out["loss"]) and torch.isfinite(emb).all()
    out["loss"].backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_vqa_head_starts_at_the_answer_prior():
    config = small_config(init_std=0.02)
    model = UnifiedModel(config).eval()
    prior = torch.tensor([0.5, 0.2, 0.0, 1.0])
    model.attach_vqa_head(4, answer_prior=prior)
    torch.testing.assert_close(model.vqa_head[-1].bias,
                               torch.logit(prior.clamp(1e-4, 1 - 1e-4)))
    batch = make_batch(config, B=2)
    with torch.no_grad():
        logits = model.vqa_logits(batch["images"], batch["text_ids"], batch["text_mask"])
    # The output layer's weights are small: the logits sit near the prior's logits (+-9.2 for
    # the clamped 0 and 1).
    expected = torch.logit(prior.clamp(1e-4, 1 - 1e-4))
    torch.testing.assert_close(logits, expected.expand(2, 4), atol=0.3, rtol=0)
    with pytest.raises(ValueError, match="answer_prior"):
        model.attach_vqa_head(3, answer_prior=prior)


def test_tiny_config_learns_a_fixed_batch():
    """fwd + bwd + AdamW at the `tiny` size and batch 32; a few steps lower the loss. In bf16
    autocast where the CPU computes bf16 natively, as training does; in fp32 where bf16 would be
    emulated (training falls back to fp32 there; 4 steps took 54 s emulated, 4.5 s in fp32)."""
    config = load_config("tiny", vocab_size=1000)
    torch.manual_seed(0)
    model = UnifiedModel(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batch = make_batch(config, B=32, T=config.max_text_len)
    losses = []
    for _ in range(4):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=fast_bf16("cpu")):
            loss = model(**batch)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5, losses


def test_flops_formula_matches_flop_counter():
    # FlopCounterMode sees matmuls, not the fused CPU attention kernel: count with `reference`.
    config = small_config(attention_backend="reference")
    model = UnifiedModel(config)
    B, T = 4, 12
    batch = make_batch(config, B=B, T=T)
    with FlopCounterMode(display=False) as forward_count:
        out = model(**batch)
    with FlopCounterMode(display=False) as backward_count:
        out["loss"].backward()
    estimate = flops_per_sample(config, text_len=T, global_batch=B)
    forward = forward_count.get_total_flops()
    assert forward == pytest.approx(B * estimate / 3, rel=1e-9)  # the forward count is exact
    # 3x forward is the usual estimate; the patch conv needs no input gradient: within 2%.
    assert forward + backward_count.get_total_flops() == pytest.approx(B * estimate, rel=0.02)
    edited = {**batch, "neg_ids": batch["text_ids"].flip(0), "neg_mask": batch["text_mask"].flip(0),
              "has_neg": torch.tensor([True, False, True, True])}
    with FlopCounterMode(display=False) as edited_count:
        model(**edited)
    assert edited_count.get_total_flops() == pytest.approx(
        B * flops_per_sample(config, text_len=T, global_batch=B, local_batch=B,
                             edited_negatives=True, backward=False), rel=1e-9)
    itc_only = flops_per_sample(config, text_len=T, weights=LossWeights(itm=0, mlm=0),
                                backward=False)
    # Text-query fusion (image tokens only as keys and values, their memory computed once per
    # image): ITM's three fused passes and MLM together cost less than the dual encoder.
    assert estimate / 3 < 2 * itc_only


def test_sincos_positions_are_a_fixed_table_that_tells_rows_and_columns_apart():
    table = sincos_2d(grid=8, width=192)  # (64, 192)
    assert table.shape == (64, 192)
    assert table.pow(2).mean().sqrt() == pytest.approx(2 ** -0.5, rel=1e-6)
    # every patch position has its own code, and neighbours are more alike than far patches
    assert torch.cdist(table, table).fill_diagonal_(1).min() > 0.1
    near, far = (table[0] - table[1]).norm(), (table[0] - table[7]).norm()
    assert near < far
    model = UnifiedModel(small_config(position_embedding="sincos"))
    assert "image_embed.pos" not in dict(model.named_parameters())  # not trained
    assert torch.equal(model.image_embed.pos[0, 1:], sincos_2d(
        model.config.image_size // model.config.patch_size, model.config.width))
    assert not model.image_embed.pos[0, 0].any()  # CLS: no position


def test_the_uniform_share_of_itm_negatives_is_a_construction_argument(monkeypatch):
    import vlp.models.model as model_module

    shares = []

    def recording(sim, same, uniform_share=0.0):
        shares.append(uniform_share)
        return real(sim, same, uniform_share)

    real = model_module.hard_negatives
    monkeypatch.setattr(model_module, "hard_negatives", recording)
    config = small_config()
    UnifiedModel(config, itm_uniform_negatives=0.25)(**make_batch(config))
    assert shares == [0.25]
    with pytest.raises(ValueError, match=r"itm_uniform_negatives must be in \[0, 1\], got 1.5"):
        UnifiedModel(config, itm_uniform_negatives=1.5)
    for share in (0.0, 1.0):  # the bounds are allowed
        assert UnifiedModel(config, itm_uniform_negatives=share).itm_uniform_negatives == share
