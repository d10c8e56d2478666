"""Captioning in the unified model: the masks, the LM objective, cached decoding, beam search."""
import itertools

import pytest
import torch
from test_model import CLS, VOCAB, make_batch, small_config
from torch.utils.flop_counter import FlopCounterMode

from vlp.models import DecodingConfig, LossWeights, UnifiedModel, flops_per_sample, generate
from vlp.models.attention import causal_mask, seq2seq_mask
from vlp.models.decoding import _ban_repeated_ngrams, _beam_search, _LanguageModel

SEP = 2  # the end token in test_model's id layout: [PAD] [CLS] [SEP] [MASK]
LM_ONLY = LossWeights(itc=0, itm=0, mlm=0, lm=1)


def test_seq2seq_mask_position_by_position():
    # 2 image tokens, then [CLS] w1 w2 and one padding position.
    mask = seq2seq_mask(2, torch.tensor([[True, True, True, False]]))[0]
    I, T, _ = True, True, False  # noqa: E741  (rows: queries, columns: keys)
    expected = torch.tensor([
        # img0 img1  cls   w1    w2    pad
        [I, I, _, _, _, _],  # img0: the image only
        [I, I, _, _, _, _],  # img1
        [I, I, T, _, _, _],  # cls: the image and itself
        [I, I, T, T, _, _],  # w1: the image, cls, itself
        [I, I, T, T, T, _],  # w2
        [I, I, T, T, T, _],  # pad (ignored by the loss): never attends padding
    ])
    assert torch.equal(mask, expected)
    assert torch.equal(causal_mask(torch.tensor([[True, True, False]]))[0],
                       torch.tensor([[T, _, _], [T, T, _], [T, T, _]]))


def test_lm_state_t_depends_only_on_the_image_and_tokens_up_to_t():
    config = small_config()
    model = UnifiedModel(config).eval()
    batch = make_batch(config, B=2, T=10)
    images, ids = batch["images"], batch["text_ids"]
    mask = torch.ones_like(ids, dtype=torch.bool)
    with torch.no_grad():
        memory = model.image_memory(model.image_states(images))
        before = model.lm_text_states(memory, ids, mask)
        for t in range(1, 10):
            changed = ids.clone()
            changed[:, t:] = torch.randint(4, VOCAB, (2, 10 - t))
            after = model.lm_text_states(memory, changed, mask)
            torch.testing.assert_close(after[:, :t], before[:, :t])
            assert (after[:, t] - before[:, t]).abs().max() > 1e-3  # t itself is seen
        # The image is seen by every text position.
        other_image = model.image_memory(model.image_states(images.flip(0)))
        moved = (model.lm_text_states(other_image, ids, mask) - before).abs().amax(dim=2)
        assert (moved > 1e-3).all()


class SdpaCalls(torch.overrides.TorchFunctionMode):
    """Records how each scaled_dot_product_attention call was masked: ("mask", shape) or
    ("causal", None) or ("none", None)."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.scaled_dot_product_attention:
            mask = kwargs.get("attn_mask")
            self.calls.append(("mask", tuple(mask.shape)) if mask is not None else
                              ("causal", None) if kwargs.get("is_causal") else ("none", None))
        return func(*args, **kwargs)


def test_the_lm_pass_is_causal_without_a_mask_and_equals_the_masked_pass():
    """The bottom blocks take is_causal (SDPA's flash kernel takes no mask); at every real
    position the states, and so the loss and its gradients, equal those of a causal mask that
    also hides the padding."""
    config = small_config()
    model = UnifiedModel(config).eval()
    batch = make_batch(config, B=3, T=10)
    images, ids, mask = batch["images"], batch["text_ids"], batch["text_mask"].bool()
    assert not mask.all()  # padded rows: where the two passes could differ
    memory = model.image_memory(model.image_states(images))
    with SdpaCalls() as sdpa:
        states = model.lm_text_states(memory, ids, mask)
    bottom = sdpa.calls[:model.num_bottom]
    assert bottom == [("causal", None)] * model.num_bottom
    x = model.text_embed(ids)  # the same pass with the mask spelled out
    for block in model.bottom:
        x = block(x, split=0, attn_mask=causal_mask(mask))
    masked = model.fuse(memory, x, mask, queries=slice(1, None), causal=True)
    torch.testing.assert_close(states[mask], masked[mask])
    grads = [torch.autograd.grad(out[mask].square().sum(), model.text_embed.parameters(),
                                 retain_graph=True) for out in (states, masked)]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_lm_loss_is_next_token_cross_entropy_and_trains_the_fused_path():
    config = small_config()
    model = UnifiedModel(config, LM_ONLY)
    batch = make_batch(config, B=3)
    ids, mask = batch["text_ids"], batch["text_mask"]
    out = model(batch["images"], ids, mask)
    assert set(out) == {"loss", "lm_loss", "lm_acc"}
    states = model.lm_text_states(model.image_memory(model.image_states(batch["images"])), ids,
                                  mask)
    logits = model.mlm_head(states[:, :-1])
    real = mask[:, 1:]
    expected = torch.nn.functional.cross_entropy(logits[real], ids[:, 1:][real])
    torch.testing.assert_close(out["lm_loss"], expected)
    out["loss"].backward()
    top = model.top[0]
    assert top.ffn_vl.fc1.weight.grad.any() and model.bottom[0].ffn_l.fc1.weight.grad.any()
    assert model.text_embed.token.weight.grad.any()  # the tied head's decoder
    assert top.ffn_l.fc1.weight.grad is None and model.itm_head.weight.grad is None


def test_flops_formula_counts_the_lm_pass_exactly():
    config = small_config(attention_backend="reference")
    model = UnifiedModel(config, LossWeights(lm=0.5))
    B, T = 4, 12
    with FlopCounterMode(display=False) as count:
        model(**make_batch(config, B=B, T=T))
    estimate = flops_per_sample(config, text_len=T, global_batch=B, weights=model.loss_weights)
    assert count.get_total_flops() == pytest.approx(B * estimate / 3, rel=1e-9)
    without = flops_per_sample(config, text_len=T, global_batch=B)
    assert estimate > without


def test_a_cached_step_equals_the_full_pass_at_that_position():
    from vlp.models.multiway import KVCache

    config = small_config()
    model = UnifiedModel(config).eval()
    batch = make_batch(config, B=2, T=6)
    ids = batch["text_ids"]
    mask = torch.ones_like(ids, dtype=torch.bool)
    with torch.no_grad():
        memory = model.image_memory(model.image_states(batch["images"]))
        full = model.lm_text_states(memory, ids, mask)
        capacity = config.max_text_len
        caches = ([KVCache(capacity) for _ in model.bottom]
                  + [KVCache(1 + capacity) for _ in model.top])  # image CLS and text
        states = [model.lm_text_states(memory, ids[:, :1], mask[:, :1], caches)[:, 0]]
        states += [model.lm_step(memory, ids[:, t], caches) for t in range(1, 6)]
    torch.testing.assert_close(torch.stack(states, dim=1), full, atol=1e-5, rtol=1e-5)


def memorised_captioner(captions: list[list[int]], steps: int = 60):
    """A small model trained with the LM loss alone until it has learnt one caption per image."""
    config = small_config(depth=2, fusion_layers=1, image_size=32)
    torch.manual_seed(0)
    model = UnifiedModel(config, LM_ONLY)
    images = torch.randn(len(captions), 3, config.image_size, config.image_size)
    T = max(map(len, captions)) + 2
    ids = torch.zeros(len(captions), T, dtype=torch.long)
    for row, caption in enumerate(captions):
        ids[row, : len(caption) + 2] = torch.tensor([CLS, *caption, SEP])
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    for _ in range(steps):
        loss = model(images, ids, ids != 0)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval(), images


def test_a_memorised_caption_is_generated_exactly():
    captions = [[10, 11, 12, 13, 11, 12], [20, 21, 20, 21], [30], [40, 41, 42, 43, 44, 45, 46, 47]]
    model, images = memorised_captioner(captions)
    for beam_size in (1, 3):
        for use_cache in (True, False):
            config = DecodingConfig(beam_size=beam_size, use_cache=use_cache)
            assert generate(model, images, CLS, SEP, config) == captions


def random_captioner(seed: int = 0) -> tuple[UnifiedModel, torch.Tensor]:
    """An untrained model with spread-out logits (large init), so no two candidates tie."""
    config = small_config(image_size=32, init_std=0.3, position_embedding="learned")
    torch.manual_seed(seed)
    return UnifiedModel(config).eval(), torch.randn(6, 3, 32, 32)


def test_cached_and_uncached_decoding_give_the_same_tokens():
    model, images = random_captioner()
    with torch.no_grad():
        model.mlm_head.decoder.bias[SEP] += 1.5  # captions end at different steps
    for beam_size in (1, 2, 4):
        for ngram in (0, 2):
            outputs = [generate(model, images, CLS, SEP,
                                DecodingConfig(max_length=12, beam_size=beam_size,
                                               use_cache=cache, no_repeat_ngram_size=ngram))
                       for cache in (True, False)]
            assert outputs[0] == outputs[1], (beam_size, ngram)
    assert len({len(c) for c in outputs[0]}) > 1


def test_beam_size_one_is_greedy():
    model, images = random_captioner()
    with torch.no_grad():
        model.mlm_head.decoder.bias[SEP] += 1.5
    greedy = generate(model, images, CLS, SEP, DecodingConfig(max_length=10))
    assert len({len(c) for c in greedy}) > 1  # some captions end early, some run to the end
    for penalty in (0.0, 1.0, 2.0):
        beam = DecodingConfig(max_length=10, beam_size=1, length_penalty=penalty)
        lm = _LanguageModel(model, images, CLS, True, ())
        assert _beam_search(lm, SEP, 10, beam) == greedy


def test_wide_beam_search_finds_the_likeliest_caption():
    """Four words and the end token, captions of up to 3 tokens: 25 beams keep every prefix, so
    beam search must return the best of all 4 + 16 + 64 + 64 captions, enumerated here."""
    model, images = random_captioner(seed=3)
    words = [10, 11, 12, 13]
    suppress = tuple(i for i in range(VOCAB) if i not in words + [SEP])
    captions = [list(c) for n in range(4) for c in itertools.product(words, repeat=n)]
    ids = torch.zeros(len(captions), 5, dtype=torch.long)  # [CLS] caption [SEP] (none at 3)
    for row, caption in enumerate(captions):
        full = [CLS, *caption] + ([SEP] if len(caption) < 3 else [])
        ids[row, : len(full)] = torch.tensor(full)
    mask = ids != 0
    best = []
    with torch.no_grad():
        for image in images:
            memory = model.image_memory(model.image_states(image[None]))
            states = model.lm_text_states(memory.select([0] * len(captions)), ids, mask)
            logp = model.mlm_head(states[:, :-1]).log_softmax(-1)
            token_logp = logp.gather(2, ids[:, 1:, None])[..., 0] * mask[:, 1:]
            best.append(captions[token_logp.sum(1).argmax()])
    wide = DecodingConfig(max_length=3, beam_size=25, length_penalty=0.0)
    assert generate(model, images, CLS, SEP, wide, suppress_ids=suppress) == best
    greedy = generate(model, images, CLS, SEP, DecodingConfig(max_length=3),
                      suppress_ids=suppress)
    assert greedy != best  # the search matters on these images


def test_no_repeat_ngram_bans_exactly_the_completing_tokens():
    tokens = torch.tensor([[1, 5, 6, 7, 5, 6], [1, 5, 6, 5, 6, 5]])
    log_probs = torch.zeros(2, 10)
    _ban_repeated_ngrams(log_probs, tokens, 3)
    # row 0 ends "5 6": "5 6 7" exists -> 7 banned; row 1 ends "6 5": "6 5 6" exists -> 6 banned
    assert torch.isinf(log_probs).nonzero().tolist() == [[0, 7], [1, 6]]
    log_probs = torch.zeros(2, 10)
    _ban_repeated_ngrams(log_probs, tokens, 1)  # unigrams: every token seen
    assert torch.isinf(log_probs[0]).nonzero().flatten().tolist() == [1, 5, 6, 7]


def test_suppressed_tokens_and_max_length():
    model, images = random_captioner()
    captions = generate(model, images, CLS, SEP, DecodingConfig(max_length=7),
                        suppress_ids=tuple(range(60)))
    assert all(len(c) == 7 and min(c) >= 60 for c in captions)
    with pytest.raises(ValueError, match="beam_size"):
        DecodingConfig(beam_size=0)
