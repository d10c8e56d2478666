"""The model card (README.md) of an export: the model, how it was trained, how it scored, and how
to load it with vlp, transformers and open_clip."""
from __future__ import annotations

from .interop import OPEN_CLIP_DIR, REMOTE_CODE_FILES
from .model import IMAGE_MEAN, IMAGE_STD

CARD_FILE = "README.md"
OBJECTIVES = {
    "itc": "image-text contrastive (ITC, learnable temperature)",
    "itm": "image-text matching with hard negatives (ITM)",
    "mlm": "masked language modelling of the caption fused with its image (MLM)",
    "lm": "captioning: next-token prediction under the sequence-to-sequence mask (LM)",
}


def model_card(meta: dict, files: list[str],
               evaluation: dict[str, dict[str, float]] | None = None) -> str:
    """The card of an export whose config.json is `meta` and which holds `files` (top-level
    names); `evaluation` maps a benchmark to its metrics."""
    sections = [_model(meta), _training(meta), _evaluation(evaluation or {}),
                _loading(meta, files)]
    return "\n\n".join(sections) + "\n"


def _model(meta: dict) -> str:
    size = (f"width {meta['width']}, depth {meta['depth']} (the top {meta['fusion_layers']} "
            f"with a VL-FFN), {meta['heads']} heads; images {meta['image_size']}px in "
            f"{meta['patch_size']}px patches; text up to {meta['max_text_len']} tokens of a "
            f"{meta['vocab_size']}-token vocabulary; retrieval embeddings of {meta['embed_dim']}")
    lines = ["# vlp unified multiway transformer", "",
             "A VLMo-style vision-language model: shared self-attention, modality-expert "
             "feed-forward networks (image, text, fused), used as a dual encoder (retrieval "
             "embeddings) and as a fusion encoder (ITM, VQA, captioning).", "", f"Size: {size}."]
    if meta.get("vqa_num_answers"):
        lines.append(f"VQA head: {meta['vqa_num_answers']} answers ({meta['vqa_fusion']} fusion).")
    for record in ("quantization", "pruning"):
        if meta.get(record):
            lines.append(f"Compressed ({record}): `{_short(meta[record])}`.")
    return "\n".join(lines)


def _training(meta: dict) -> str:
    weights = meta.get("loss_weights", {})
    objectives = [f"- {OBJECTIVES[name]}, weight {weights[name]:g}"
                  for name in OBJECTIVES if weights.get(name)]
    lines = ["## Training", "", "Objectives:", *(objectives or ["- not recorded"]), ""]
    provenance = meta.get("provenance")
    if not provenance:
        return "\n".join(lines + ["Data and steps: not recorded (the export was written outside "
                                  "`vlp export`)."])
    step, batch = provenance.get("step"), provenance.get("global_batch")
    seen = f" ({step * batch:,} samples at a global batch of {batch})" if step and batch else ""
    lines += [f"- Source: `{provenance.get('source')}`",
              f"- Steps: {step if step is not None else 'not recorded'}{seen}",
              f"- Data: {provenance.get('data') or 'not recorded'}"]
    return "\n".join(lines)


def _evaluation(evaluation: dict[str, dict[str, float]]) -> str:
    if not evaluation:
        return "## Evaluation\n\nNo evaluation results were found beside the checkpoint."
    rows = [f"| {benchmark} | {metric} | {value:.4g} |"
            for benchmark, metrics in sorted(evaluation.items())
            for metric, value in sorted(metrics.items())]
    return "\n".join(["## Evaluation", "", "Scores of the checkpoint these weights were exported "
                      "from, as its evaluation jobs recorded them beside it:", "",
                      "| benchmark | metric | value |", "|---|---|---:|", *rows])


def _loading(meta: dict, files: list[str]) -> str:
    size = meta["image_size"]
    parts = ["## How to load", "",
             f"Images: the centre square, resized to {size}x{size} (bicubic), pixels scaled to "
             f"[0, 1] and normalised with mean {list(IMAGE_MEAN)} and std {list(IMAGE_STD)}. "
             "Text: tokenizer.json, [CLS] first, padded to at most "
             f"{meta['max_text_len']} tokens.", "", "With vlp (every model and head):", "",
             "```python", "from vlp.models import from_pretrained",
             "model = from_pretrained(\"EXPORT_DIR\")  # encode_image, encode_text, itm_logits",
             "```"]
    if all(name in files for name in REMOTE_CODE_FILES):
        parts += ["", "With transformers (the dual encoder; L2-normalised embeddings):", "",
                  "```python", "from transformers import AutoModel, AutoTokenizer",
                  "model = AutoModel.from_pretrained(\"EXPORT_DIR\", trust_remote_code=True)",
                  "tokenizer = AutoTokenizer.from_pretrained(\"EXPORT_DIR\")",
                  "text = tokenizer([\"a red circle\"], padding=True, truncation=True, "
                  "return_tensors=\"pt\")",
                  "text_emb = model.get_text_features(text.input_ids, text.attention_mask)",
                  "image_emb = model.get_image_features(pixel_values)  # (B, 3, H, W), normalised",
                  "```"]
    if OPEN_CLIP_DIR in files:
        parts += ["", "With open_clip (image embeddings equal vlp's; text embeddings only for "
                  "captions that fill the context, as open_clip's text tower attends to "
                  "padding: docs/interop.md):", "", "```python", "import open_clip",
                  "model, _, preprocess = open_clip.create_model_and_transforms(",
                  f"    \"local-dir:EXPORT_DIR/{OPEN_CLIP_DIR}\")",
                  f"tokenizer = open_clip.get_tokenizer(\"local-dir:EXPORT_DIR/{OPEN_CLIP_DIR}\")",
                  "```"]
    return "\n".join(parts)


def _short(record) -> str:
    """A compression record in one line, at most 120 characters."""
    text = str(record)
    return text if len(text) <= 120 else text[:117] + "..."
