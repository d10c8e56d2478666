"""What lets other libraries load an export: `transformers` (remote code beside config.json and
the weights) and open_clip (an `open_clip/` folder with its own config and weights).

transformers: config.json gains `model_type`, `architectures` and `auto_map`, and the export
carries configuration_vlp.py and modeling_vlp.py (vlp/models/hf_remote), so
`AutoModel.from_pretrained(export, trust_remote_code=True)` builds the dual encoder from the
export's own model.safetensors.

open_clip: the dual encoder as open_clip's CLIP (docs/interop.md has the mapping). The shared
attention is copied into both towers; the patch convolution's bias, which open_clip's has not,
is folded into the patch positions. open_clip's text tower attends to padding (its config has no
key-padding mask), so its text embeddings equal vlp's only for captions that fill
`max_text_len`; the image embeddings are equal.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .config import ModelConfig
from .model import IMAGE_MEAN, IMAGE_STD, UnifiedModel

REMOTE_CODE_DIR = Path(__file__).parent / "hf_remote"
REMOTE_CODE_FILES = ("configuration_vlp.py", "modeling_vlp.py")
HF_CONFIG = {
    "model_type": "vlp",
    "architectures": ["VlpDualEncoder"],
    "auto_map": {"AutoConfig": "configuration_vlp.VlpConfig",
                 "AutoModel": "modeling_vlp.VlpDualEncoder"},
}
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
OPEN_CLIP_DIR = "open_clip"
OPEN_CLIP_CONFIG_FILE = "open_clip_config.json"
OPEN_CLIP_WEIGHTS_FILE = "open_clip_model.safetensors"  # a name vlp's loader does not take


def tokenizer_config(special_tokens: dict[str, str], max_text_len: int) -> dict:
    """tokenizer_config.json: lets AutoTokenizer (and open_clip's HFTokenizer) load tokenizer.json
    with its special tokens."""
    return {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_text_len,
            "padding_side": "right", "truncation_side": "right", **special_tokens}


def open_clip_config(config: ModelConfig) -> dict:
    """open_clip_config.json for `create_model_and_transforms("local-dir:<export>/open_clip")`."""
    norm = {"eps": config.layer_norm_eps}
    tower = {"width": config.width, "layers": config.depth, "mlp_ratio": config.mlp_ratio,
             "norm_kwargs": norm}
    vision = {**tower, "image_size": config.image_size, "patch_size": config.patch_size,
              "head_width": config.width // config.heads, "no_ln_pre": True, "pool_type": "tok"}
    text = {**tower, "context_length": config.max_text_len, "vocab_size": config.vocab_size,
            "heads": config.heads, "no_causal_mask": True, "pool_type": "first",
            # any non-empty name: with local-dir: open_clip reads the folder's tokenizer files
            "hf_tokenizer_name": OPEN_CLIP_DIR}
    preprocess = {"size": config.image_size, "mean": list(IMAGE_MEAN), "std": list(IMAGE_STD),
                  "interpolation": "bicubic", "resize_mode": "shortest"}
    return {"model_cfg": {"embed_dim": config.embed_dim, "quick_gelu": False,
                          "vision_cfg": vision, "text_cfg": text},
            "preprocess_cfg": preprocess}


def open_clip_state_dict(model: UnifiedModel) -> dict[str, torch.Tensor]:
    """The dual encoder's weights under open_clip CLIP's names (docs/interop.md)."""
    embed = model.image_embed
    patch_bias = embed.patch.bias.expand(model.config.num_patches, -1)  # (P, width); CLS: none
    positions = embed.pos[0] + torch.cat([torch.zeros_like(patch_bias[:1]), patch_bias])
    state = {
        "visual.conv1.weight": embed.patch.weight,
        "visual.class_embedding": embed.cls.reshape(-1),
        "visual.positional_embedding": positions,  # (1 + P, width)
        "visual.proj": model.image_proj.weight.T,
        "token_embedding.weight": model.text_embed.token.weight,
        "positional_embedding": model.text_embed.pos[0],
        "text_projection": model.text_proj.weight.T,
        "logit_scale": model.logit_scale.reshape(()),
    }
    for prefix in ("visual.ln_post", "ln_final"):
        state |= _pair(prefix, model.norm)
    for i, block in enumerate(model.blocks):
        for prefix, ffn in ((f"visual.transformer.resblocks.{i}", block.ffn_v),
                            (f"transformer.resblocks.{i}", block.ffn_l)):
            state |= (_pair(f"{prefix}.ln_1", block.norm) | _pair(f"{prefix}.ln_2", ffn.norm)
                      | _pair(f"{prefix}.mlp.c_fc", ffn.fc1)
                      | _pair(f"{prefix}.mlp.c_proj", ffn.fc2)
                      | _pair(f"{prefix}.attn.out_proj", block.attn.proj))
            state[f"{prefix}.attn.in_proj_weight"] = block.attn.qkv.weight
            state[f"{prefix}.attn.in_proj_bias"] = block.attn.qkv.bias
    return {name: tensor.detach().contiguous().clone() for name, tensor in state.items()}


def _pair(prefix: str, module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A Linear's or LayerNorm's weight and bias under `prefix`."""
    return {f"{prefix}.weight": module.weight, f"{prefix}.bias": module.bias}
