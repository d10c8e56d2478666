"""Under DeepSpeed ZeRO-3 the model initialises, computes and differentiates as it does alone.

This catches the ZeRO-3 pitfalls: a parameter used outside a module's forward (empty under
ZeRO-3), init lost under `zero.Init`, tied weights, 0-d parameters. Runs in a subprocess so that
DeepSpeed's process group stays out of the test process.
"""
import json
import subprocess
import sys
import textwrap

import pytest
from train_helpers import REPO, single_rank_env

pytestmark = pytest.mark.slow

SCRIPT = textwrap.dedent("""
    import json, sys, torch, deepspeed
    from deepspeed.utils import safe_get_full_grad
    from vlp.models import LossWeights, UnifiedModel, load_config

    deepspeed.init_distributed(dist_backend="gloo")
    config = load_config("tiny", vocab_size=50, width=32, heads=2, depth=3, fusion_layers=2)
    ds_config = {"train_micro_batch_size_per_gpu": 4,
                 "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
    torch.manual_seed(0)
    weights = LossWeights(lm=0.5)  # every objective of pretraining
    plain = UnifiedModel(config, weights)
    torch.manual_seed(0)
    with deepspeed.zero.Init(config_dict_or_path=ds_config):
        sharded = UnifiedModel(config, weights)
    engine, *_ = deepspeed.initialize(model=sharded, config=ds_config,
                                      optimizer=torch.optim.AdamW(sharded.parameters()))
    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params):
        same_init = all(torch.equal(p, q) for p, q in zip(params, plain.parameters()))

    g = torch.Generator().manual_seed(1)
    images = torch.randn(4, 3, 64, 64, generator=g)
    ids = torch.randint(4, 50, (4, 10), generator=g)
    mask = torch.arange(10) < torch.tensor([[10], [7], [4], [9]])
    labels = torch.full_like(ids, -100)
    labels[:, 1:3] = ids[:, 1:3]
    batch = (images, ids, mask, ids.masked_fill(labels != -100, 3), labels)
    torch.manual_seed(2)  # the same hard negatives for both
    out = engine(*batch)
    torch.manual_seed(2)
    expected = plain(*batch)
    engine.backward(out["loss"])
    expected["loss"].backward()
    grad_error = max((safe_get_full_grad(p) - q.grad).abs().max().item()
                     for p, q in zip(params, plain.parameters()))
    json.dump({"same_init": same_init, "grad_error": grad_error,
               "losses": {k: [out[k].item(), expected[k].item()] for k in expected}},
              open(sys.argv[1], "w"))
""")


def test_zero3_matches_the_plain_model(tmp_path):
    result_path = tmp_path / "result.json"
    env = single_rank_env()
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(result_path)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(result_path.read_text())
    assert result["same_init"]
    for name, (sharded, plain) in result["losses"].items():
        assert sharded == pytest.approx(plain, abs=1e-5), name
    assert result["grad_error"] < 1e-5
