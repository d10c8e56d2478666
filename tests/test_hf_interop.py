"""Weights others can load, and weights to start from: a model initialised from local Hugging Face
BERT and ViT checkpoints (tiny, random, saved to tmp_path), and an export that transformers'
AutoModel and open_clip load with the encoders' own outputs."""
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import AutoModel, AutoTokenizer, BertConfig, BertForMaskedLM, ViTConfig, ViTModel

from vlp.models import UnifiedModel, load_config, save_pretrained
from vlp.models.hf_init import HFInitError, init_towers, pretrained_weights
from vlp.pipeline.data.errors import UserError
from vlp.pipeline.data.tokenizer import load_tokenizer, tokenize
from vlp.pipeline.train.config import load_train_config

WIDTH, DEPTH, HEADS, VOCAB, IMAGE, PATCH = 32, 3, 2, 60, 64, 8
CAPTIONS = ["a red circle left of a blue square", "two green triangles", "a small yellow star"]


def config(**overrides):
    return load_config("tiny", **{"vocab_size": VOCAB, "width": WIDTH, "depth": DEPTH,
                                  "heads": HEADS, "fusion_layers": 1, **overrides})


@pytest.fixture
def bert_dir(tmp_path):
    """BertForMaskedLM (the MLM head included), eps 1e-6 as the model's LayerNorms."""
    torch.manual_seed(1)
    bert = BertForMaskedLM(BertConfig(
        vocab_size=VOCAB, hidden_size=WIDTH, num_hidden_layers=DEPTH, num_attention_heads=HEADS,
        intermediate_size=4 * WIDTH, max_position_embeddings=64, layer_norm_eps=1e-6))
    bert.save_pretrained(tmp_path / "bert")
    return tmp_path / "bert"


@pytest.fixture
def vit_dir(tmp_path):
    torch.manual_seed(2)
    vit = ViTModel(ViTConfig(hidden_size=WIDTH, num_hidden_layers=DEPTH, num_attention_heads=HEADS,
                             intermediate_size=4 * WIDTH, image_size=IMAGE, patch_size=PATCH,
                             layer_norm_eps=1e-6))
    vit.save_pretrained(tmp_path / "vit")
    return tmp_path / "vit"


def test_a_vit_initialised_image_tower_computes_what_the_vit_computes(vit_dir):
    """ViT is pre-LN like this model: with an identity projection, the image embedding is the
    normalised ViT CLS output."""
    model = UnifiedModel(config(embed_dim=WIDTH, position_embedding="learned")).eval()
    report = init_towers(model, image_from=vit_dir)
    with torch.no_grad():
        model.image_proj.weight.copy_(torch.eye(WIDTH))
        images = torch.randn(2, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(0))
        vit = ViTModel.from_pretrained(vit_dir).eval()
        expected = F.normalize(vit(pixel_values=images).last_hidden_state[:, 0], dim=-1)
        torch.testing.assert_close(model.encode_image(images), expected, atol=1e-5, rtol=0)
    assert report.unused == ["image:pooler.dense.bias", "image:pooler.dense.weight"]
    assert "blocks.0.ffn_l.fc1.weight" in report.kept and "text_embed.pos" in report.kept
    assert report.loaded["blocks.1.attn.qkv.weight"] == [
        f"image:encoder.layer.1.attention.attention.{n}.weight" for n in ("query", "key", "value")]


def test_bert_weights_land_where_the_mapping_table_says(bert_dir):
    """Checked against the tensors as the folder stores them (the names docs/interop.md uses)."""
    model = UnifiedModel(config()).eval()
    report = init_towers(model, text_from=bert_dir)
    bert = BertForMaskedLM.from_pretrained(bert_dir).eval()
    ids = torch.tensor([[2, 17, 33, 3]])
    with torch.no_grad():
        # [CLS]-first single-segment input: the first block's LayerNorm of the embeddings is
        # BERT's embedding output (token + position + type 0, then its LayerNorm).
        torch.testing.assert_close(model.blocks[0].norm(model.text_embed(ids)),
                                   bert.bert.embeddings(input_ids=ids), atol=1e-5, rtol=0)
    saved = load_file(bert_dir / "model.safetensors")
    expected = {"norm.bias": "bert.encoder.layer.2.output.LayerNorm.bias",
                "mlm_head.dense.weight": "cls.predictions.transform.dense.weight",
                "mlm_head.decoder.bias": "cls.predictions.bias",
                "blocks.2.ffn_vl.fc1.weight": "bert.encoder.layer.2.intermediate.dense.weight"}
    for i in range(DEPTH):
        layer = f"bert.encoder.layer.{i}"
        expected |= {f"blocks.{i}.attn.proj.bias": f"{layer}.attention.output.dense.bias",
                     f"blocks.{i}.ffn_l.norm.weight": f"{layer}.attention.output.LayerNorm.weight",
                     f"blocks.{i}.ffn_l.fc1.weight": f"{layer}.intermediate.dense.weight",
                     f"blocks.{i}.ffn_l.fc2.weight": f"{layer}.output.dense.weight"}
        if i:
            before = f"bert.encoder.layer.{i - 1}.output.LayerNorm.weight"  # layer i's input
            expected[f"blocks.{i}.norm.weight"] = before
    state = model.state_dict()
    for ours, theirs in expected.items():
        assert torch.equal(state[ours], saved[theirs]), ours
    qkv = [saved[f"bert.encoder.layer.1.attention.self.{n}.weight"]
           for n in ("query", "key", "value")]
    assert torch.equal(state["blocks.1.attn.qkv.weight"], torch.cat(qkv))
    assert report.unused == [] and "image_embed.patch.weight" in report.kept


def test_with_both_checkpoints_the_shared_attention_comes_from_the_vit(bert_dir, vit_dir):
    model = UnifiedModel(config()).eval()
    report = init_towers(model, text_from=bert_dir, image_from=vit_dir)
    saved = load_file(vit_dir / "model.safetensors")
    assert torch.equal(model.blocks[0].attn.proj.weight,
                       saved["encoder.layer.0.attention.output.dense.weight"])
    assert "text:encoder.layer.0.attention.self.query.weight" in report.unused
    assert "text:embeddings.LayerNorm.weight" in report.unused
    assert report.kept == ["logit_scale", "type_embed.weight", "image_proj.weight",
                           "text_proj.weight", "itm_head.weight", "itm_head.bias"]


def test_a_checkpoint_that_does_not_fit_is_one_error_naming_the_tensor_and_both_shapes(
        bert_dir, vit_dir):
    with pytest.raises(HFInitError, match=r"embeddings.word_embeddings.weight \(60, 32\), but "
                                          r"the model's text_embed.token.weight has shape "
                                          r"\(70, 32\)$"):
        pretrained_weights(config(vocab_size=70), text_from=bert_dir)
    with pytest.raises(HFInitError, match=r"position_embeddings \(1, 65, 32\), but the model's "
                                          r"image_embed.pos has shape \(1, 17, 32\)$"):
        pretrained_weights(config(image_size=32, position_embedding="learned"), image_from=vit_dir)
    with pytest.raises(HFInitError, match="num_hidden_layers is 3, the model's depth is 4"):
        pretrained_weights(config(depth=4), image_from=vit_dir)
    with pytest.raises(HFInitError, match="model_type is 'vit'; this initialisation reads bert"):
        pretrained_weights(config(), text_from=vit_dir)


def test_the_training_keys_refuse_a_warm_start_beside_an_initialisation():
    cfg = load_train_config(None, ["model.init_text_from=bert", "model.init_image_from=vit"])
    assert (cfg.model.init_text_from, cfg.model.init_image_from) == ("bert", "vit")
    with pytest.raises(UserError, match="model.init_from sets every weight"):
        load_train_config(None, ["model.init_from=runs/x/checkpoints",
                                 "model.init_image_from=vit"])


# ---- exports that transformers and open_clip load ------------------------------------------------

@pytest.fixture
def exported(tmp_path):
    """A trained-looking model exported through `vlp export`'s path (from an export), with the
    tokenizer it was trained with; returns (model, export dir, tokenizer)."""
    from vlp.data_prep.tokenizer import train_tokenizer
    from vlp.pipeline.data.model_loading import load_model
    from vlp.pipeline.deploy.export import save_export

    tokenizer_json = train_tokenizer(CAPTIONS * 20, tmp_path / "tokenizer", vocab_size=VOCAB)
    torch.manual_seed(0)
    model = UnifiedModel(config(vocab_size=len(load_tokenizer(tokenizer_json)))).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    save_pretrained(model, tmp_path / "source", tokenizer_path=tokenizer_json)
    out = save_export(load_model(tmp_path / "source"), tmp_path / "export")
    return model, out, load_tokenizer(tokenizer_json)


def inputs(tokenizer, max_len):
    ids, mask = tokenize(tokenizer, CAPTIONS, max_len)
    images = torch.randn(3, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(0))
    return images, ids, mask


def test_transformers_automodel_loads_the_export_and_gives_vlps_embeddings(exported):
    model, out, tokenizer = exported
    meta = json.loads((out / "config.json").read_text())
    assert meta["model_type"] == "vlp" and "AutoModel" in meta["auto_map"]
    hf = AutoModel.from_pretrained(out, trust_remote_code=True).eval()
    hf_tokenizer = AutoTokenizer.from_pretrained(out)
    images, ids, mask = inputs(tokenizer, model.config.max_text_len)
    encoded = hf_tokenizer(CAPTIONS, padding="max_length", max_length=ids.size(1),
                           return_tensors="pt")
    assert torch.equal(encoded.input_ids, ids) and not mask.all()  # padded captions
    with torch.no_grad():
        expected_image, expected_text = model.encode_image(images), model.encode_text(ids, mask)
        full = hf(input_ids=ids, attention_mask=encoded.attention_mask, pixel_values=images)
        half = hf.to(torch.bfloat16)(input_ids=ids, attention_mask=encoded.attention_mask,
                                     pixel_values=images.bfloat16())
    torch.testing.assert_close(full.image_embeds, expected_image, atol=1e-5, rtol=0)
    torch.testing.assert_close(full.text_embeds, expected_text, atol=1e-5, rtol=0)
    torch.testing.assert_close(full.logits_per_image, model.itc_logit_scale()
                               * expected_image @ expected_text.T, atol=1e-4, rtol=0)
    torch.testing.assert_close(half.image_embeds.float(), expected_image, atol=3e-2, rtol=0)
    torch.testing.assert_close(half.text_embeds.float(), expected_text, atol=3e-2, rtol=0)


def test_open_clip_loads_the_export_from_a_local_folder(exported):
    """Image embeddings equal vlp's; text embeddings equal for a caption that fills the context
    (open_clip's text tower attends to padding: docs/interop.md)."""
    open_clip = pytest.importorskip("open_clip")
    model, out, tokenizer = exported
    clip, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{out}/open_clip")
    clip.eval()
    T = model.config.max_text_len
    images, ids, _ = inputs(tokenizer, T)
    assert torch.equal(open_clip.get_tokenizer(f"local-dir:{out}/open_clip")(CAPTIONS), ids)
    full = torch.randint(5, len(tokenizer), (2, T), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(clip.encode_image(images, normalize=True),
                                   model.encode_image(images), atol=1e-5, rtol=0)
        torch.testing.assert_close(clip.encode_text(full, normalize=True),
                                   model.encode_text(full, torch.ones_like(full, dtype=bool)),
                                   atol=1e-5, rtol=0)
    assert preprocess.transforms[-1].mean == [0.48145466, 0.4578275, 0.40821073]


def test_the_model_card_carries_provenance_and_the_evaluation_beside_the_source(tmp_path):
    from vlp.data_prep.tokenizer import train_tokenizer
    from vlp.pipeline.data.model_loading import load_model
    from vlp.pipeline.deploy.export import save_export

    tokenizer_json = train_tokenizer(CAPTIONS * 20, tmp_path / "tokenizer", vocab_size=VOCAB)
    run = tmp_path / "runs/tiny"
    provenance = {"source": "runs/tiny/checkpoints/global_step540", "step": 540,
                  "data": "shards shards/{00000..00011}.tar (epochs)", "global_batch": 128}
    save_pretrained(UnifiedModel(config(vocab_size=len(load_tokenizer(tokenizer_json)))),
                    run / "export", tokenizer_path=tokenizer_json, provenance=provenance)
    (run / "eval/export").mkdir(parents=True)
    (run / "eval/export/retrieval.json").write_text(json.dumps(
        {"metrics": {"image_retrieval_recall@1": 0.907, "note": "text"}, "baselines": {}}))
    (run / "eval/export/retrieval.results.json").write_text("[]")

    out = save_export(load_model(run / "export"), tmp_path / "copy")
    card = (out / "README.md").read_text()
    assert json.loads((out / "config.json").read_text())["provenance"] == provenance
    assert "- Steps: 540 (69,120 samples at a global batch of 128)" in card
    assert "- Data: shards shards/{00000..00011}.tar (epochs)" in card
    assert "| retrieval | image_retrieval_recall@1 | 0.907 |" in card
    assert "- image-text contrastive (ITC, learnable temperature), weight 1" in card
    assert "trust_remote_code=True" in card and "local-dir:EXPORT_DIR/open_clip" in card


@pytest.mark.slow
def test_a_zero3_run_starts_from_the_vit_and_its_export_card_says_where_from(
        tmp_path, shard_dir, tokenizer_dir):
    """Two ranks, ZeRO-3: every parameter the ViT maps is gathered and written before DeepSpeed
    builds its optimizer, so the initial checkpoint holds the ViT's weights."""
    from train_helpers import run_training, train_overrides

    from vlp.models.export import from_pretrained
    from vlp.pipeline.cli import main as vlp

    torch.manual_seed(3)
    ViTModel(ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=256, image_size=IMAGE, patch_size=PATCH),
             add_pooling_layer=False).save_pretrained(tmp_path / "vit")
    run_dir = tmp_path / "run"
    overrides = train_overrides(run_dir, shard_dir, tokenizer_dir, "optim.max_steps=1",
                                "optim.warmup_steps=0", "checkpoint.save_initial=true",
                                f"model.init_image_from={tmp_path / 'vit'}")
    assert run_training(overrides, tmp_path / "log.txt", nproc=2) == 0
    assert "kept at their initialisation" in (tmp_path / "log.txt").read_text()

    out = tmp_path / "export"
    assert vlp(["export", "--checkpoint", str(run_dir / "checkpoints/global_step0"),
                "--out", str(out)]) == 0
    exported = from_pretrained(out)
    expected, report = pretrained_weights(exported.config, image_from=tmp_path / "vit")
    state = exported.state_dict()
    assert "blocks.1.attn.qkv.weight" in expected and "image_embed.pos" not in expected  # sincos
    for name, value in expected.items():
        # ZeRO-3 builds its fp32 master weights from the module's training-dtype copy: bf16 where
        # the CPU has native bf16, fp32 otherwise.
        assert torch.equal(state[name], value) or torch.equal(state[name],
                                                              value.bfloat16().float()), name
    card = (out / "README.md").read_text()
    assert "- Steps: 0" in card and f"- Data: shards {shard_dir}" in card
