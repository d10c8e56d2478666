"""Helpers shared by the evaluation tests (no tests here): a tokenizer trained on the synthetic
world's text and an untrained tiny model, as the evaluation jobs receive them; the progress
lines a job printed."""
from __future__ import annotations

import json
import re
from pathlib import Path

TINY = {"depth": 2, "width": 64, "heads": 2, "fusion_layers": 1, "embed_dim": 32}


def world_texts(world: Path) -> list[str]:
    karpathy = json.loads((world / "retrieval/dataset_synth.json").read_text())
    texts = [s["raw"] for image in karpathy["images"] for s in image["sentences"]]
    for questions in sorted((world / "vqa").glob("*_questions.json")):
        texts += [q["question"] for q in json.loads(questions.read_text())["questions"]]
    return texts


def progress_lines(err: str, label: str) -> list[str]:
    """The count of each progress line of `label` on stderr, checked to be whole lines with a
    rate and an ETA."""
    assert "\r" not in err
    lines = [line for line in err.splitlines() if line.startswith(f"{label}: ")]
    assert all(re.search(r" \| [\d.]+ ?\S+/\S+ \| elapsed \S+ \| ETA \S+$", line)
               for line in lines), lines
    return [line.split(" | ")[0] for line in lines]


def train_world_tokenizer(world: Path, out_dir: Path) -> Path:
    from vlp.data_prep.tokenizer import train_tokenizer

    return train_tokenizer(world_texts(world), out_dir, vocab_size=300)


def tiny_model_on(texts: list[str], folder: Path, vocab_size: int):
    """The untrained tiny model with a tokenizer trained on `texts` (written to `folder`)."""
    from vlp.data_prep.tokenizer import train_tokenizer

    return tiny_eval_model(train_tokenizer(texts, folder, vocab_size=vocab_size))


def tiny_eval_model(tokenizer_json: Path, seed: int = 0):
    """An LoadedModel (untrained tiny UnifiedModel + tokenizer) built in memory."""
    import torch

    from vlp.models.config import load_config
    from vlp.models.model import UnifiedModel
    from vlp.pipeline.data.model_loading import CheckpointInfo, LoadedModel
    from vlp.pipeline.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_json)
    config = load_config("tiny", vocab_size=len(tokenizer), **TINY)
    torch.manual_seed(seed)
    model = UnifiedModel(config).eval()
    info = CheckpointInfo(path="memory", kind="export", tag=None, step=None,
                          config=config.to_dict())
    return LoadedModel(model, tokenizer, info)



def spy_loading_and_autocast(monkeypatch, job_module, loaded) -> tuple[list, list]:
    """Replace `job_module.load_model` by one that returns `loaded` and records (path, device),
    and wrap the encoders' autocast to record each bf16 flag: (loads, bf16 flags)."""
    from vlp.pipeline.eval import encode

    loads, casts, autocast = [], [], encode.autocast

    def load_model(path, device="cpu"):
        loads.append((path, device))
        return loaded

    def spy_autocast(device, bf16):
        casts.append(bf16)
        return autocast(device, bf16)

    monkeypatch.setattr(job_module, "load_model", load_model)
    monkeypatch.setattr(encode, "autocast", spy_autocast)
    return loads, casts

# Train a tiny model a few steps with a single-rank DeepSpeed ZeRO-3 engine (CPU, gloo, fp32) and
# publish a checkpoint after each listed step with the training loop's own save_checkpoint; beside
# each, the engine's gathered weights (reference_step{N}.safetensors) for comparison.
_TRAIN_AND_SAVE = """
import json, sys
from pathlib import Path
import deepspeed, torch
from safetensors.torch import save_file
from vlp.pipeline.data.tokenizer import load_tokenizer
from vlp.models.config import load_config
from vlp.models.export import config_meta
from vlp.models.model import LossWeights, UnifiedModel
from vlp.pipeline.train.checkpointer import save_checkpoint

run_dir, tokenizer_json, tiny = Path(sys.argv[1]), Path(sys.argv[2]), json.loads(sys.argv[3])
save_steps = [int(s) for s in sys.argv[4].split(",")]
deepspeed.init_distributed(dist_backend="gloo")
tokenizer = load_tokenizer(tokenizer_json)
config = load_config("tiny", vocab_size=len(tokenizer), **tiny)
ds_config = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1,
             "zero_optimization": {"stage": 3}, "steps_per_print": 10**6}
torch.manual_seed(0)
with deepspeed.zero.Init(config_dict_or_path=ds_config):  # as training builds it
    model = UnifiedModel(config, loss_weights=LossWeights(mlm=0))
engine, *_ = deepspeed.initialize(model=model, config=ds_config,
                                  optimizer=torch.optim.AdamW(model.parameters(), lr=1e-2))
ids = torch.randint(5, len(tokenizer), (4, config.max_text_len))
mask = torch.ones_like(ids, dtype=torch.bool)
for step in range(1, max(save_steps) + 1):
    images = torch.randn(4, 3, config.image_size, config.image_size)
    loss = engine(images, ids, mask)["loss"]
    engine.backward(loss)
    engine.step()
    if step in save_steps:
        metadata = {"config.json": json.dumps(config_meta(engine.module)),
                    "tokenizer.json": tokenizer_json.read_text()}
        save_checkpoint(engine, run_dir / "checkpoints", step, {"step": step}, metadata, 0)
        params = dict(engine.module.named_parameters())
        with deepspeed.zero.GatheredParameters(list(params.values())):
            weights = {n: p.detach().float().clone() for n, p in params.items()}
        save_file(weights, run_dir / f"reference_step{step}.safetensors")
"""


def train_zero3_run(run_dir: Path, tokenizer_json: Path, save_steps: tuple[int, ...]) -> None:
    """A real ZeRO-3 run directory with a checkpoint tag per step in `save_steps`."""
    import subprocess
    import sys

    from train_helpers import single_rank_env

    env = single_rank_env(OMP_NUM_THREADS="1")
    args = [str(run_dir), str(tokenizer_json), json.dumps(TINY), ",".join(map(str, save_steps))]
    done = subprocess.run([sys.executable, "-c", _TRAIN_AND_SAVE, *args], env=env,
                          cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True,
                          timeout=300)
    if done.returncode != 0:
        raise RuntimeError(f"ZeRO-3 helper run failed:\n{done.stderr[-4000:]}")
