"""`vlp export` consolidates a ZeRO-3 checkpoint into exactly the engine's weights."""
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import REPO, single_rank_env, train_overrides

from vlp.models.export import from_pretrained
from vlp.pipeline.cli import main as vlp

pytestmark = pytest.mark.slow

# Train 2 steps on one rank, then gather the ZeRO-3 partitions the way DeepSpeed does for
# inference and save them: the reference the export must reproduce.
TRAIN_AND_GATHER = textwrap.dedent("""
    import sys, deepspeed
    from safetensors.torch import save_file
    from vlp.pipeline.train.config import load_train_config
    from vlp.pipeline.train.trainer import Trainer
    trainer = Trainer(load_train_config(None, sys.argv[2:]))
    trainer.run()
    params = dict(trainer.engine.module.named_parameters())
    with deepspeed.zero.GatheredParameters(list(params.values())):
        save_file({n: p.detach().clone() for n, p in params.items()}, sys.argv[1])
""")


def test_export_equals_gathered_engine_weights(tmp_path, shard_dir, tokenizer_dir):
    run_dir = tmp_path / "run"
    gathered_path = tmp_path / "gathered.safetensors"
    overrides = train_overrides(run_dir, shard_dir, tokenizer_dir, "optim.max_steps=2",
                                "checkpoint.every_steps=2", "data.num_workers=0")
    env = single_rank_env()
    done = subprocess.run([sys.executable, "-c", TRAIN_AND_GATHER, str(gathered_path), *overrides],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    out = tmp_path / "export"
    assert vlp(["export", "--checkpoint", str(run_dir / "checkpoints"), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md", "config.json", "configuration_vlp.py", "model.safetensors",
        "modeling_vlp.py", "open_clip", "tokenizer.json", "tokenizer_config.json"]
    exported = from_pretrained(out).state_dict()
    gathered = load_file(gathered_path)
    assert set(gathered) <= set(exported)
    for name, engine_weight in gathered.items():
        # The engine computes in bf16 (fp32 on a CPU without native bf16); its weights are the
        # fp32 master weights rounded to that dtype.
        assert torch.equal(exported[name].to(engine_weight.dtype), engine_weight), name
    assert any(not torch.equal(w, torch.zeros_like(w)) for w in gathered.values())
