"""The unified model against answers known without it: written-out formulas (CLIP's pixel
statistics, the sin-cos table), transformers' BERT head, the model's own encoders and heads
(what the VQA head reads, forward's diagnostics), and stubs that fix the ITM head's answer or
record the negatives it is shown."""
import math

import pytest
import torch
import torch.nn.functional as F
from test_model import VOCAB, make_batch, small_config
from torch import nn

from vlp.models import LossWeights, UnifiedModel
from vlp.models import model as model_module
from vlp.models.export import config_meta
from vlp.models.model import sincos_2d


def head_input(layer: nn.Module, run) -> torch.Tensor:
    """What `layer` receives while `run()` executes."""
    seen = []
    handle = layer.register_forward_hook(lambda module, args, out: seen.append(args[0]))
    try:
        run()
    finally:
        handle.remove()
    return seen[0]


def record_itm_texts(model: UnifiedModel, monkeypatch) -> list[torch.Tensor]:
    """The text states of every `itm_scores` call from now on (positives first, then each
    image's negative text, ...), in a list filled as forward runs."""
    scored, itm_scores = [], model.itm_scores

    def recording(memory, texts, masks):
        scored.append(texts)
        return itm_scores(memory, texts, masks)

    monkeypatch.setattr(model, "itm_scores", recording)
    return scored


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


def test_itm_never_draws_a_copy_of_an_images_caption_as_its_negative(monkeypatch):
    """Captions 0 and 1 are the same words: images 0 and 1 must get caption 2 as their negative
    text, in every draw, although ITC finds the copy the most similar."""
    config = small_config()
    model = UnifiedModel(config, LossWeights(mlm=0)).eval()
    batch = make_batch(config, B=3)
    ids, mask = batch["text_ids"].clone(), batch["text_mask"].clone()
    ids[1], mask[1] = ids[0], mask[0]
    scored = record_itm_texts(model, monkeypatch)
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


def test_itm_loss_and_accuracy_from_fixed_scores(monkeypatch):
    """The ITM head's scores fixed (log-odds o per pair, rows: 3 positives, 3 negative texts,
    3 negative images, 3 edits of which the last is missing): the loss is the cross-entropy
    over the 11 labelled pairs plus the mean over the 2 edited images of softplus(-(o(caption) -
    o(edit))); the accuracy is 7 of 11 (the largest score is a negative image's); the caption
    beats its edit for one of the two edited images and ties for the other."""
    config = small_config()
    model = UnifiedModel(config, LossWeights(itc=0, mlm=0)).eval()
    batch = make_batch(config, B=3)
    edits = make_batch(config, B=3, seed=1)
    odds = torch.tensor([2.0, -1, 3, -2, 1, -4, 5, -3, -1, 1, -1, 7])
    scores = torch.stack([torch.zeros_like(odds), odds], dim=1)

    def fixed(memory, texts, masks):
        assert texts.shape[0] == 12
        return scores

    monkeypatch.setattr(model, "itm_scores", fixed)
    with torch.no_grad():
        out = model(**batch, neg_ids=edits["text_ids"], neg_mask=edits["text_mask"],
                    has_neg=torch.tensor([True, True, False]))
    # Label 1 costs softplus(-o), label 0 softplus(o).
    pair_losses = F.softplus(torch.cat([-odds[:3], odds[3:11]]))
    ranking = F.softplus(-(odds[:2] - odds[9:11]))
    assert out["itm_loss"].item() == pytest.approx(
        pair_losses.mean().item() + ranking.mean().item())
    assert out["itm_acc"].item() == pytest.approx(7 / 11)
    assert out["itm_edited_acc"].item() == 0.5


def test_itm_draws_its_hard_negatives_from_the_itc_similarities(monkeypatch):
    """ITC's similarities (stubbed: image i finds caption i + 1 far the most similar after its
    own) decide each image's negative text."""
    config = small_config()
    model = UnifiedModel(config, LossWeights(mlm=0)).eval()
    batch = make_batch(config, B=3)
    peaked = torch.full((3, 3), -50.0)
    peaked[torch.arange(3), (torch.arange(3) + 1) % 3] = 50.0
    contrastive_loss = model_module.contrastive_loss

    def contrastive_with_peaked_similarities(*args):
        loss, accuracy, _ = contrastive_loss(*args)
        return loss, accuracy, peaked

    monkeypatch.setattr("vlp.models.model.contrastive_loss", contrastive_with_peaked_similarities)
    scored = record_itm_texts(model, monkeypatch)
    with torch.no_grad():
        states = model.text_states(batch["text_ids"], batch["text_mask"])
        for seed in range(10):
            torch.manual_seed(seed)
            model(**batch)
    for texts in scored:
        for image in range(3):
            torch.testing.assert_close(texts[3 + image], states[(image + 1) % 3])


def test_one_edit_that_itc_ranks_below_its_caption_gives_an_edited_accuracy_of_1():
    config = small_config()
    model = UnifiedModel(config, LossWeights(itm=0, mlm=0)).eval()
    batch = make_batch(config, B=3)
    images, ids, mask = batch["images"], batch["text_ids"], batch["text_mask"]
    with torch.no_grad():
        sims = model.encode_image(images) @ model.encode_text(ids, mask).T  # (3, 3)
        # the one edited image's edit: another caption that ITC ranks below its own
        image, edit = next((i, j) for i in range(3) for j in range(3) if sims[i, j] < sims[i, i])
        neg_ids, neg_mask = ids.clone(), mask.clone()
        neg_ids[image], neg_mask[image] = ids[edit], mask[edit]
        out = model(images, ids, mask, neg_ids=neg_ids, neg_mask=neg_mask,
                    has_neg=torch.arange(3) == image)
    assert out["itc_edited_acc"].item() == 1.0


def test_itm_without_itc_draws_its_negatives_uniformly(monkeypatch):
    config = small_config()
    model = UnifiedModel(config, LossWeights(itc=0, mlm=0)).eval()
    batch = make_batch(config, B=3)
    scored = record_itm_texts(model, monkeypatch)
    with torch.no_grad():
        states = model.text_states(batch["text_ids"], batch["text_mask"])
        for seed in range(30):
            torch.manual_seed(seed)
            assert torch.isfinite(model(**batch)["itm_loss"])
    drawn = [[next(j for j in range(3) if torch.allclose(texts[3 + i], states[j]))
              for i in range(3)] for texts in scored]
    for image in range(3):  # every other caption, never its own
        assert {row[image] for row in drawn} == set(range(3)) - {image}


def test_sincos_table_entries_are_written_out():
    """Entry (row r, column c), channel by channel: the row's code then the column's, each the
    sines then the cosines of the coordinate at frequencies 10000^(-j / (width / 4))."""
    # The small model's table, at a tolerance that a base of 10001 instead of 10000 exceeds.
    grid, width = 8, 64
    table = sincos_2d(grid, width)
    frequencies = [10000 ** (-j / (width // 4)) for j in range(width // 4)]
    for r in range(grid):
        for c in range(grid):
            expected = [wave(coord * f) for coord in (r, c) for wave in (math.sin, math.cos)
                        for f in frequencies]
            torch.testing.assert_close(table[r * grid + c], torch.tensor(expected),
                                       rtol=0, atol=1e-6)
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


def test_uint8_pixels_are_normalised_into_the_weights_dtype():
    model = UnifiedModel(small_config(position_embedding="sincos")).eval().to(torch.bfloat16)
    pixels = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    with torch.no_grad():
        assert model.image_embed(pixels).dtype == torch.bfloat16


def test_image_embedding_has_vits_layout_and_does_not_save_the_fixed_table():
    """CLS (1, 1, width) and learned positions (1, 1 + patches, width), as ViT's cls_token and
    position_embeddings; the sin-cos table and the pixel statistics are rebuilt, never saved in
    a checkpoint."""
    config = small_config(position_embedding="learned")
    learned = UnifiedModel(config)
    assert learned.image_embed.cls.shape == (1, 1, config.width)
    assert learned.image_embed.pos.shape == (1, 1 + config.num_patches, config.width)
    assert "image_embed.pos" in learned.state_dict()
    sincos = UnifiedModel(small_config(position_embedding="sincos"))
    saved = {key for key in sincos.state_dict() if key.startswith("image_embed.")}
    assert saved == {"image_embed.cls", "image_embed.patch.weight", "image_embed.patch.bias"}


def test_images_of_another_size_are_refused_with_both_sizes():
    embed = UnifiedModel(small_config()).image_embed
    with pytest.raises(ValueError, match=r"^images are \(32, 48\), the model expects 64x64$"):
        embed(torch.zeros(2, 3, 32, 48, dtype=torch.uint8))


def test_a_config_without_a_vocabulary_size_is_refused_with_how_to_set_it():
    with pytest.raises(ValueError, match=r"^config\.vocab_size is unset: load_config\(name, "
                       r"vocab_size=tokenizer\.get_vocab_size\(\)\)$"):
        UnifiedModel(small_config(vocab_size=None))


def test_text_tokens_are_the_token_plus_the_position_counted_from_start():
    embed = UnifiedModel(small_config()).text_embed
    ids = torch.tensor([[3, 5, 7]])
    with torch.no_grad():
        embed.pos.normal_()
        torch.testing.assert_close(embed(ids, start=4)[0],
                                   embed.token.weight[[3, 5, 7]] + embed.pos[0, 4:7])
    max_len = embed.pos.size(1)
    assert embed(ids, start=max_len - 3).shape == (1, 3, embed.pos.size(2))  # up to the last
    with pytest.raises(ValueError, match=rf"^text length {max_len + 1} exceeds max_text_len "
                                         rf"{max_len}$"):
        embed(ids, start=max_len - 2)


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


def test_embedding_parameters_start_truncated_normal_at_the_init_std():
    """CLS, learned positions and token embeddings: std init_std, cut at two std (ViT, BEiT)."""
    torch.manual_seed(0)
    model = UnifiedModel(small_config(init_std=0.02, position_embedding="learned"))
    for name in ("image_embed.cls", "image_embed.pos", "text_embed.pos", "text_embed.token.weight"):
        param = dict(model.named_parameters())[name]
        assert param.std().item() == pytest.approx(0.02 * 0.88, rel=0.25), name  # truncation: 0.88
        assert param.abs().max().item() <= 0.04, name


def test_linear_and_norm_layers_start_as_bert_initialises_them():
    """Every linear and convolution weight truncated normal at init_std, every bias zero, every
    LayerNorm the identity (weight 1, bias 0), the VQA head's layers included."""
    torch.manual_seed(0)
    model = UnifiedModel(small_config(init_std=0.02))
    model.attach_vqa_head(5)
    layers = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d, nn.LayerNorm))]
    assert any(isinstance(m, nn.Conv2d) for m in layers) and len(layers) > 20
    for layer in layers:
        if isinstance(layer, nn.LayerNorm):
            assert torch.equal(layer.weight, torch.ones_like(layer.weight))
        else:
            assert layer.weight.abs().max().item() <= 0.04
            assert layer.weight.std().item() == pytest.approx(0.02 * 0.88, rel=0.25)
        assert layer.bias is None or torch.equal(layer.bias, torch.zeros_like(layer.bias))


def test_every_layer_norm_uses_the_configs_epsilon():
    model = UnifiedModel(small_config(layer_norm_eps=1e-3))
    model.attach_vqa_head(5)
    norms = [m for m in model.modules() if isinstance(m, nn.LayerNorm)]
    assert len(norms) > 5 and {norm.eps for norm in norms} == {1e-3}


def test_the_model_saves_its_parameters_and_no_buffer():
    """The type ids, like the sin-cos table and the pixel statistics, are rebuilt, not saved:
    a checkpoint holds the parameters (the tied MLM decoder under both names) and nothing else."""
    model = UnifiedModel(small_config())
    assert "type_ids" in dict(model.named_buffers())
    assert set(model.state_dict()) == {name for name, _ in
                                       model.named_parameters(remove_duplicate=False)}


def test_a_model_without_a_vqa_head_records_the_fused_default_in_its_config():
    meta = config_meta(UnifiedModel(small_config()))
    assert meta["vqa_num_answers"] is None and meta["vqa_fusion"] == "fused"


def test_each_fused_block_reads_its_own_image_memory():
    """Three fused blocks: changing block i's patch keys and values changes the fused pass."""
    config = small_config(depth=4, fusion_layers=3)
    model = UnifiedModel(config).eval()
    batch = make_batch(config, B=2)
    with torch.no_grad():
        memory = model.image_memory(model.image_states(batch["images"]))
        text = model.text_states(batch["text_ids"], batch["text_mask"])
        fused = model.fuse(memory, text, batch["text_mask"])
        for block in range(3):
            kv = list(memory.kv)
            kv[block] = tuple(t + 1 for t in kv[block])
            changed = model.fuse(memory._replace(kv=kv), text, batch["text_mask"])
            assert not torch.allclose(changed, fused), block


def test_the_losses_are_computed_in_fp32_from_bf16_weights():
    config = small_config()
    model = UnifiedModel(config).to(torch.bfloat16)
    batch = make_batch(config)
    out = model(**{**batch, "images": batch["images"].bfloat16()})
    assert {out[f"{name}_loss"].dtype for name in ("itc", "itm", "mlm")} == {torch.float32}
