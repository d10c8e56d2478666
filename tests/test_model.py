"""The unified model: configs, shapes, padding, expert routing, gradients, bf16, FLOPs."""
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
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


def head_input(layer: nn.Module, run) -> torch.Tensor:
    """What `layer` receives while `run()` executes."""
    seen = []
    handle = layer.register_forward_hook(lambda module, args, out: seen.append(args[0]))
    try:
        run()
    finally:
        handle.remove()
    return seen[0]


def test_late_fusion_vqa_reads_the_cls_states_retrieval_pools():
    """The late-fusion head reads [image CLS; question CLS] as retrieval pools them: projected and
    normalised, they are encode_image and encode_text (the question's padding masked, every image
    token through the image expert: 65 tokens, more than the width)."""
    config = small_config()
    assert 1 + config.num_patches > config.width
    model = UnifiedModel(config).eval()
    model.attach_vqa_head(5, fusion="late")
    batch = make_batch(config, B=3)
    images, ids, mask = batch["images"], batch["text_ids"], batch["text_mask"]
    assert not mask.all()  # padded questions
    with torch.no_grad():
        features = head_input(model.vqa_head[0], lambda: model.vqa_logits(images, ids, mask))
        image_cls, text_cls = features.split(config.width, dim=-1)
        torch.testing.assert_close(F.normalize(model.image_proj(image_cls), dim=-1),
                                   model.encode_image(images))
        torch.testing.assert_close(F.normalize(model.text_proj(text_cls), dim=-1),
                                   model.encode_text(ids, mask))


def test_fused_vqa_reads_the_fused_state_the_itm_head_reads():
    """With tiny's pooling (the fused pass's text [CLS], position 1) the VQA head reads what the
    ITM head reads for the same image and question."""
    config = small_config()
    assert config.fused_pooling == "text_cls"
    model = UnifiedModel(config).eval()
    model.attach_vqa_head(5)
    batch = make_batch(config, B=3)
    images, ids, mask = batch["images"], batch["text_ids"], batch["text_mask"]
    with torch.no_grad():
        vqa_in = head_input(model.vqa_head[0], lambda: model.vqa_logits(images, ids, mask))
        itm_in = head_input(model.itm_head, lambda: model.itm_logits(images, ids, mask))
        memory = model.image_memory(model.image_states(images))
        fused = model.fuse(memory, model.text_states(ids, mask), mask)
    torch.testing.assert_close(vqa_in, fused[:, 1])
    torch.testing.assert_close(itm_in, fused[:, 1])


def test_vqa_head_is_an_mlp_with_the_models_layer_norm_in_the_models_dtype():
    config = small_config(layer_norm_eps=1e-3)
    model = UnifiedModel(config).to(torch.bfloat16)
    model.attach_vqa_head(3)
    head = model.vqa_head
    assert [type(layer) for layer in head] == [nn.Linear, nn.LayerNorm, nn.GELU, nn.Linear]
    hidden = config.vqa_hidden_mult * config.width
    assert (head[0].in_features, head[0].out_features, head[-1].out_features) == (64, hidden, 3)
    assert head[1].normalized_shape == (hidden,) and head[1].eps == 1e-3
    assert {p.dtype for p in head.parameters()} == {torch.bfloat16}


def test_zero_weight_skips_the_objective_and_mlm_needs_its_inputs():
    config = small_config()
    batch = make_batch(config)
    itc_only = UnifiedModel(config, LossWeights(itm=0, mlm=0))
    out = itc_only(batch["images"], batch["text_ids"], batch["text_mask"])
    assert set(out) == {"loss", "itc_loss", "itc_acc", "temperature"}
    with pytest.raises(ValueError, match="mlm_ids"):
        UnifiedModel(config)(batch["images"], batch["text_ids"], batch["text_mask"])


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


def test_itm_never_draws_a_copy_of_an_images_caption_as_its_negative(monkeypatch):
    """Captions 0 and 1 are the same words: images 0 and 1 must get caption 2 as their negative
    text, in every draw, although ITC finds the copy the most similar."""
    config = small_config()
    model = UnifiedModel(config, LossWeights(mlm=0)).eval()
    batch = make_batch(config, B=3)
    ids, mask = batch["text_ids"].clone(), batch["text_mask"].clone()
    ids[1], mask[1] = ids[0], mask[0]
    scored = []
    itm_scores = model.itm_scores
    monkeypatch.setattr(model, "itm_scores", lambda memory, texts, masks: (
        scored.append(texts), itm_scores(memory, texts, masks))[1])
    with torch.no_grad():
        caption_2 = model.text_states(ids, mask)[2]
        for seed in range(20):
            torch.manual_seed(seed)
            model(batch["images"], ids, mask)
    for texts in scored:  # positives, then the negative text of each image, then ...
        for image in (0, 1):
            torch.testing.assert_close(texts[3 + image], caption_2)


def test_itm_accuracy_counts_the_pairs_with_a_label():
    """The ITM head forced to say "match": a lone pair is right (1.0); with its edit, which
    should be "no match", half right."""
    config = small_config()
    model = UnifiedModel(config, LossWeights(mlm=0)).eval()
    batch = make_batch(config, B=1)
    edit = make_batch(config, B=1, seed=1)
    with torch.no_grad():
        model.itm_head.bias.copy_(torch.tensor([0.0, 50.0]))
        alone = model(batch["images"], batch["text_ids"], batch["text_mask"],
                      neg_ids=edit["text_ids"], neg_mask=edit["text_mask"],
                      has_neg=torch.tensor([False]))
        with_edit = model(batch["images"], batch["text_ids"], batch["text_mask"],
                          neg_ids=edit["text_ids"], neg_mask=edit["text_mask"],
                          has_neg=torch.tensor([True]))
    assert alone["itm_acc"].item() == 1.0 and with_edit["itm_acc"].item() == 0.5


def test_itm_without_itc_draws_its_negatives_uniformly(monkeypatch):
    config = small_config()
    model = UnifiedModel(config, LossWeights(itc=0, mlm=0)).eval()
    batch = make_batch(config, B=3)
    scored = []
    itm_scores = model.itm_scores
    monkeypatch.setattr(model, "itm_scores", lambda memory, texts, masks: (
        scored.append(texts), itm_scores(memory, texts, masks))[1])
    with torch.no_grad():
        states = model.text_states(batch["text_ids"], batch["text_mask"])
        for seed in range(30):
            torch.manual_seed(seed)
            assert torch.isfinite(model(**batch)["itm_loss"])
    drawn = [[next(j for j in range(3) if torch.allclose(texts[3 + i], states[j]))
              for i in range(3)] for texts in scored]
    for image in range(3):  # every other caption, never its own
        assert {row[image] for row in drawn} == set(range(3)) - {image}


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


def test_sincos_table_entries_are_written_out():
    """Entry (row r, column c), channel by channel: the row's code then the column's, each the
    sines then the cosines of the coordinate at frequencies 10000^(-j / (width / 4))."""
    grid, width = 3, 8
    table = sincos_2d(grid, width)
    frequencies = [10000 ** (-j / (width // 4)) for j in range(width // 4)]
    for r in range(grid):
        for c in range(grid):
            expected = [wave(coord * f) for coord in (r, c) for wave in (math.sin, math.cos)
                        for f in frequencies]
            torch.testing.assert_close(table[r * grid + c], torch.tensor(expected))
    with pytest.raises(ValueError, match=r"^2D sin-cos positions need a width divisible by 4, "
                                         r"got 6$"):
        sincos_2d(3, 6)


def test_uint8_pixels_are_normalised_with_clips_statistics():
    """The loader ships uint8; the model normalises with CLIP's mean and std (written out here),
    so uint8 pixels embed exactly as the float images a CLIP preprocessing would give."""
    model = UnifiedModel(small_config()).eval()
    pixels = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    mean = 255 * torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(3, 1, 1)
    std = 255 * torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(model.image_embed(pixels),
                                   model.image_embed((pixels.float() - mean) / std))


def test_image_tokens_are_cls_then_patches_plus_their_positions():
    config = small_config(position_embedding="sincos")
    embed = UnifiedModel(config).image_embed
    with torch.no_grad():
        embed.cls.normal_()
        images = torch.randn(2, 3, 64, 64)
        tokens = embed(images)
        patches = embed.patch(images).flatten(2).transpose(1, 2)  # row-major patch order
    torch.testing.assert_close(tokens[:, 0], embed.cls[0].expand(2, -1))  # no CLS position
    torch.testing.assert_close(tokens[:, 1:] - patches, sincos_2d(8, 64).expand(2, -1, -1))


def test_mlm_head_computes_berts_prediction_head():
    """Against transformers' BertLMPredictionHead holding the same weights."""
    from transformers import BertConfig
    from transformers.models.bert.modeling_bert import BertLMPredictionHead

    config = small_config(layer_norm_eps=1e-3)
    model = UnifiedModel(config).eval()
    bert = BertLMPredictionHead(BertConfig(hidden_size=64, vocab_size=VOCAB, hidden_act="gelu",
                                           layer_norm_eps=1e-3))
    with torch.no_grad():
        for param in model.mlm_head.parameters():
            param.normal_()
        head = model.mlm_head
        for ours, theirs in ((head.dense, bert.transform.dense),
                             (head.norm, bert.transform.LayerNorm), (head.decoder, bert.decoder)):
            theirs.weight.copy_(ours.weight)
            theirs.bias.copy_(ours.bias)
        x = torch.randn(5, 64)
        torch.testing.assert_close(head(x), bert(x))
    assert head.decoder.weight is model.text_embed.token.weight  # tied


def test_the_itc_scale_is_exp_of_the_parameter_clamped_at_100():
    model = UnifiedModel(small_config())
    assert model.itc_logit_scale().item() == pytest.approx(1 / 0.07)  # CLIP's initial temperature
    with torch.no_grad():
        model.logit_scale.fill_(math.log(20.0))
        assert model.itc_logit_scale().item() == pytest.approx(20.0)
        model.logit_scale.fill_(math.log(1000.0))
        assert model.itc_logit_scale().item() == pytest.approx(100.0)
    assert model.itc_logit_scale().shape == ()


def test_the_fused_pass_adds_type_0_to_the_image_and_type_1_to_the_text():
    """Moving each type embedding into the states by hand gives the same fused pass."""
    config = small_config()
    model = UnifiedModel(config).eval()
    batch = make_batch(config, B=2)
    ids, mask = batch["text_ids"], batch["text_mask"]
    with torch.no_grad():
        model.type_embed.weight.normal_()
        image_states = model.image_states(batch["images"])
        text_states = model.text_states(ids, mask)
        fused = model.fuse(model.image_memory(image_states), text_states, mask)
        image_type, text_type = model.type_embed.weight.clone()
        model.type_embed.weight.zero_()
        by_hand = model.fuse(model.image_memory(image_states + image_type),
                             text_states + text_type, mask)
    torch.testing.assert_close(fused, by_hand)


def test_forward_weighs_the_losses_and_reports_diagnostics_the_model_agrees_with():
    """The total is the weighted sum; the temperature is 1 / scale; the edited-caption
    accuracies count, over the images that have an edit (and only with ITC on, ITM off, too),
    how often ITC's similarity and ITM's log-odds prefer the caption to its edit."""
    config = small_config()
    weights = LossWeights(itc=0.5, itm=2.0, mlm=0.25)
    model = UnifiedModel(config, weights).eval()
    batch = make_batch(config, B=4)
    images, ids, mask = batch["images"], batch["text_ids"], batch["text_mask"]
    edits = make_batch(config, B=4, seed=1)
    has_neg = torch.tensor([True, True, True, False])
    negatives = dict(neg_ids=edits["text_ids"], neg_mask=edits["text_mask"], has_neg=has_neg)
    with torch.no_grad():
        out = model(**batch, **negatives)
        image_emb, text_emb = model.encode_image(images), model.encode_text(ids, mask)
        edit_emb = model.encode_text(edits["text_ids"], edits["text_mask"])
        true_itm = model.itm_logits(images, ids, mask)
        edit_itm = model.itm_logits(images, edits["text_ids"], edits["text_mask"])
        itc_only = UnifiedModel(config, LossWeights(itm=0, mlm=0)).eval()
        itc_only.load_state_dict(model.state_dict())
        itc_out = itc_only(images, ids, mask, **negatives)
    assert out["loss"].item() == pytest.approx(
        0.5 * out["itc_loss"].item() + 2 * out["itm_loss"].item() + 0.25 * out["mlm_loss"].item())
    assert out["temperature"].item() == pytest.approx(1 / model.itc_logit_scale().item())
    prefer = ((image_emb * text_emb).sum(-1) > (image_emb * edit_emb).sum(-1))[:3]
    assert out["itc_edited_acc"].item() == pytest.approx(prefer.float().mean().item())
    assert itc_out["itc_edited_acc"].item() == pytest.approx(prefer.float().mean().item())
    odds = (true_itm[:, 1] - true_itm[:, 0]) - (edit_itm[:, 1] - edit_itm[:, 0])
    assert out["itm_edited_acc"].item() == pytest.approx((odds[:3] > 0).float().mean().item())
    assert 0 < prefer.sum() < 3 or 0 < (odds[:3] > 0).sum() < 3  # the counts tell things apart


def test_the_bottom_blocks_send_every_image_token_to_the_image_expert_and_text_to_the_text_one():
    """Perturbing one expert's weights changes only its modality's states (65 image tokens, more
    than the width, 64: none may reach the text expert)."""
    config = small_config()
    batch = make_batch(config, B=2)

    def states_after_perturbing(expert: str | None) -> tuple[torch.Tensor, torch.Tensor]:
        torch.manual_seed(0)  # the same initial weights each time
        model = UnifiedModel(config).eval()
        with torch.no_grad():
            for block in model.bottom if expert else ():
                for param in getattr(block, expert).parameters():
                    param.add_(torch.randn_like(param))
            return (model.image_states(batch["images"]),
                    model.text_states(batch["text_ids"], batch["text_mask"]))

    image, text = states_after_perturbing(None)
    image_v, text_v = states_after_perturbing("ffn_v")
    image_l, text_l = states_after_perturbing("ffn_l")
    torch.testing.assert_close(text_v, text)
    torch.testing.assert_close(image_l, image)
    assert not torch.allclose(image_v, image) and not torch.allclose(text_l, text)


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
