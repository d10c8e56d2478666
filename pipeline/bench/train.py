"""`vlp bench train`: one training step (forward + backward + AdamW) of our model vs HF CLIPModel.

The fair comparison is contrastive-only: our model with LossWeights(itc=1, itm=0, mlm=0) against
`transformers.CLIPModel` built from a CLIPConfig with the same widths, depths, heads, image and
patch size, text length, vocabulary, projection size and batch (random init, nothing
downloaded). Both towers of CLIP use exact GELU, as ours does (CLIP's default quick_gelu would
cost the reference extra elementwise passes). The full ITC+ITM+MLM step is then timed against
our ITC step.

Same policy on both sides: fp32 master weights, `--dtype bf16` runs the forward under
torch.autocast(bfloat16) (fp32 runs it in fp32), torch's fused AdamW (lr 1e-4, wd 0.05) over
all parameters, SDPA attention (HF: attn_implementation="sdpa"). Our model may additionally run
under torch.compile (`--compile blocks`: each transformer block compiled, graphs shared by
blocks of the same shape; `whole`: the whole forward); compile time is measured separately as
the first compiled call minus a steady-state step. `--compile-reference` compiles CLIP's
encoder layers the same way, to show how much of the gap is compilation.

MFU has training's definition (vlp.pipeline.train.metrics): model FLOPs per sample x samples/s /
peak, the peak training uses: the GPU's dense datasheet figure in the step's dtype
(vlp.pipeline.train.peak_flops), else (a CPU, a GPU the table lacks, fp32) a dense square matmul
in that dtype measured in the same run by the same function training uses (measure_peak_flops:
8192^3 with CUDA events on a GPU, 2048^3 on the CPU with this process's threads). Our FLOPs come
from
models.flops.flops_per_sample; CLIP's are counted by torch's FlopCounterMode on one forward
(math SDPA, so attention is seen) x 3. They differ by one thing: our encoders' last block only
computes the pooled CLS position, CLIP's computes every position.
"""
from __future__ import annotations

import argparse
import time

from vlp.pipeline.bench.common import (
    DEFAULT_VOCAB,
    environment,
    format_table,
    interleaved_timings,
    load_model_config,
    median,
    median_or_none,
    out_path,
    record_figure,
    repeats_for,
    resolve_device,
    round_ratio_median,
    set_threads,
    synchronize,
    verdict,
    write_json,
)

GOAL_ITC_SPEEDUP = 1.5  # our ITC step vs HF CLIP, samples/s
GOAL_FULL_COST = 2.0  # full ITC+ITM+MLM step time / our ITC step time
CLS_ID, SEP_ID, PAD_ID, MASK_ID = 2, 3, 0, 4  # first ids of a BERT-style vocabulary
FIRST_WORD_ID = 5


def add_arguments(p) -> None:
    p.add_argument("--config", help="model size or JSON (default: tiny on CPU, base on CUDA)")
    p.add_argument("--batch", type=int, help="per-step batch (default: 32 tiny, 16 small, "
                   "8 base/large on CPU; 128 on CUDA)")
    p.add_argument("--vocab", type=int, default=DEFAULT_VOCAB,
                   help="vocabulary when the config has none (tiny); default BERT's 30522")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default=None,
                   help="bf16: autocast forward with fp32 master weights (both models); default "
                        "bf16 where it is fast (GPUs, CPUs with native bf16), else fp32")
    p.add_argument("--compile", choices=["none", "blocks", "whole"], default=None,
                   help="torch.compile our model; the compiled variants are then the headline "
                        "(default: blocks on CUDA; none on CPU, where it was measured not to pay, "
                        "and with --quick)")
    p.add_argument("--compile-reference", action="store_true",
                   help="also time HF CLIP with its encoder layers compiled")
    p.add_argument("--eager", action=argparse.BooleanOptionalAction, default=True,
                   help="with --compile, also time our eager model (default: yes)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per variant")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and the batch")


# ---- inputs and models -----------------------------------------------------------------------

def model_config(args, device: str):
    name = args.config or ("tiny" if args.quick or device == "cpu" else "base")
    return name, load_model_config(name, vocab=args.vocab, quick=args.quick)


def default_batch(name: str, device: str, quick: bool) -> int:
    if quick:
        return 4
    if device != "cpu":
        return 128
    return {"tiny": 32, "small": 16}.get(name, 8)


def make_batch(config, batch: int, device: str, seed: int) -> dict:
    """Random images, captions of random length ([CLS] w... [SEP], padded) and BERT masking."""
    import torch

    from vlp.pipeline.data.transforms import MaskingSpec, mask_tokens

    g = torch.Generator().manual_seed(seed)
    T = config.max_text_len
    images = torch.randn(batch, 3, config.image_size, config.image_size, generator=g)
    lengths = torch.randint(max(3, T // 4), T + 1, (batch,), generator=g)
    ids = torch.randint(FIRST_WORD_ID, config.vocab_size, (batch, T), generator=g)
    mask = torch.arange(T)[None, :] < lengths[:, None]
    ids[:, 0] = CLS_ID
    ids[torch.arange(batch), lengths - 1] = SEP_ID
    ids[~mask] = PAD_ID
    spec = MaskingSpec(mask_token_id=MASK_ID, vocab_size=config.vocab_size,
                       special_ids=(PAD_ID, 1, CLS_ID, SEP_ID, MASK_ID))
    mlm_ids, mlm_labels = mask_tokens(ids, mask, spec, g)
    tensors = dict(images=images, text_ids=ids, text_mask=mask, mlm_ids=mlm_ids,
                   mlm_labels=mlm_labels)
    return {k: v.to(device) for k, v in tensors.items()}


def build_hf_clip(config):
    """transformers.CLIPModel with our sizes; [SEP] is its EOS token (where CLIP pools text)."""
    from transformers import CLIPConfig, CLIPModel

    shared = dict(hidden_size=config.width, intermediate_size=config.mlp_hidden,
                  num_hidden_layers=config.depth, num_attention_heads=config.heads,
                  hidden_act="gelu", layer_norm_eps=config.layer_norm_eps)
    clip_config = CLIPConfig(
        text_config=dict(vocab_size=config.vocab_size, max_position_embeddings=config.max_text_len,
                         pad_token_id=PAD_ID, bos_token_id=CLS_ID, eos_token_id=SEP_ID, **shared),
        vision_config=dict(image_size=config.image_size, patch_size=config.patch_size, **shared),
        projection_dim=config.embed_dim,
    )
    clip_config._attn_implementation = "sdpa"
    return CLIPModel(clip_config)


def compile_blocks(modules, dynamic: bool = False) -> None:
    """Regional compilation: compile each repeated block in place (Module.compile).

    Dynamo inlines nn.Module calls and treats parameters as inputs, so blocks of the same
    structure and input shapes share one compiled graph: compile cost does not grow with depth.
    """
    import torch._dynamo

    # one graph per (block kind, sequence shape, split): image, text, fused (B and 3B) ...
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 32)
    for module in modules:
        module.compile(dynamic=dynamic)


class Stepper:
    """One model + fused AdamW; `step()` runs forward, backward and the optimizer update."""

    def __init__(self, model, batch: dict, dtype: str, device: str, hf: bool = False):
        import torch

        self.model = model.to(device).train()
        self.batch = batch
        self.hf = hf
        self.device_type = "cuda" if device.startswith("cuda") else "cpu"
        self.autocast = dtype == "bf16"
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05,
                                           fused=True)
        self.last_loss = None

    def step(self):
        import torch

        b = self.batch
        with torch.autocast(self.device_type, torch.bfloat16, enabled=self.autocast):
            if self.hf:
                loss = self.model(input_ids=b["text_ids"], attention_mask=b["text_mask"].long(),
                                  pixel_values=b["images"], return_loss=True).loss
            else:
                loss = self.model(**b)["loss"]
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.last_loss = loss.detach()


def hf_clip_flops_per_sample(model, batch: dict, samples: int = 4) -> float:
    """CLIP's forward FLOPs on a few samples, counted by FlopCounterMode, x 3 for fwd + bwd."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    n = min(samples, batch["images"].size(0))
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as count:
        model(input_ids=batch["text_ids"][:n], attention_mask=batch["text_mask"][:n].long(),
              pixel_values=batch["images"][:n], return_loss=True)
    return 3 * count.get_total_flops() / n


def timed_first_step(stepper: Stepper, device: str) -> float:
    synchronize(device)
    start = time.perf_counter()
    stepper.step()
    synchronize(device)
    return time.perf_counter() - start


# ---- the benchmark -----------------------------------------------------------------------------

def step_peak(dtype, device: str, quick: bool) -> tuple[float, str]:
    """(peak FLOP/s, its source) as training takes it: the datasheet's, else measured."""
    import torch

    from vlp.pipeline.train.metrics import PEAK_MATMUL_SIZE, measure_peak_flops
    from vlp.pipeline.train.peak_flops import known_peak

    peak = known_peak(None, torch.device(device), dtype)
    if peak is not None:
        return peak.tflops * 1e12, peak.source
    size = 512 if quick else PEAK_MATMUL_SIZE.get(torch.device(device).type, 2048)
    return measure_peak_flops(dtype, device=device, size=size), f"measured {size}^3 matmul"


def run(args) -> int:
    import torch

    from vlp.models.flops import flops_per_sample
    from vlp.models.model import LossWeights, UnifiedModel
    from vlp.pipeline.distributed import fast_bf16
    from vlp.pipeline.train.metrics import mfu

    set_threads(args.threads)
    device = resolve_device(args.device)
    args.dtype = args.dtype or ("bf16" if fast_bf16(device) else "fp32")
    name, config = model_config(args, device)
    batch_size = args.batch or default_batch(name, device, args.quick)
    compile_mode = args.compile or ("none" if args.quick or device == "cpu" else "blocks")
    repeats = repeats_for(args, full=7)
    warmup = 1 if args.quick else args.warmup
    batch = make_batch(config, batch_size, device, args.seed)

    itc_weights, full_weights = LossWeights(itc=1, itm=0, mlm=0), LossWeights()
    torch.manual_seed(args.seed)
    variants: dict[str, Stepper] = {"hf_clip_itc": Stepper(build_hf_clip(config), batch,
                                                           args.dtype, device, hf=True)}
    roles = {"hf_clip_itc": ("HF CLIPModel", "ITC", "eager")}
    compile_s: dict[str, float] = {}
    if compile_mode == "none" or args.eager:
        variants["ours_itc"] = Stepper(UnifiedModel(config, itc_weights), batch, args.dtype, device)
        variants["ours_full"] = Stepper(UnifiedModel(config, full_weights), batch, args.dtype,
                                        device)
        roles.update(ours_itc=("ours", "ITC", "eager"), ours_full=("ours", "ITC+ITM+MLM", "eager"))
    if compile_mode != "none":
        for key, weights, objective in (("itc", itc_weights, "ITC"),
                                        ("full", full_weights, "ITC+ITM+MLM")):
            model = UnifiedModel(config, weights).to(device)
            if compile_mode == "blocks":
                compile_blocks(model.blocks)
            else:
                model = torch.compile(model)
            label = f"ours_{key}_compiled"
            variants[label] = Stepper(model, batch, args.dtype, device)
            roles[label] = ("ours", objective, f"compile:{compile_mode}")
            compile_s[label] = timed_first_step(variants[label], device)
    if args.compile_reference:
        model = build_hf_clip(config)
        compile_blocks([*model.vision_model.encoder.layers, *model.text_model.encoder.layers])
        variants["hf_clip_itc_compiled"] = Stepper(model, batch, args.dtype, device, hf=True)
        roles["hf_clip_itc_compiled"] = ("HF CLIPModel", "ITC", "compile:blocks")
        compile_s["hf_clip_itc_compiled"] = timed_first_step(variants["hf_clip_itc_compiled"],
                                                              device)

    peak_dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    peak, peak_source = step_peak(peak_dtype, device, args.quick)

    flops = {
        ("ours", "ITC"): flops_per_sample(config, global_batch=batch_size, weights=itc_weights),
        ("ours", "ITC+ITM+MLM"): flops_per_sample(config, global_batch=batch_size,
                                                  weights=full_weights),
        ("HF CLIPModel", "ITC"): hf_clip_flops_per_sample(variants["hf_clip_itc"].model, batch),
    }

    def record_round(label: str, r: int, step_s: float) -> None:
        sps = batch_size / step_s
        record_figure("train", config=name, batch=batch_size, dtype=args.dtype, variant=label,
                      round=r, step_s=step_s, samples_per_s=sps,
                      mfu=mfu(flops[roles[label][:2]], sps, peak))

    timings = interleaved_timings({k: v.step for k, v in variants.items()}, repeats,
                                  warmup=warmup, device=device, on_time=record_round)
    rows, results = [], {}
    for label, t in timings.items():
        model_name, objective, mode = roles[label]
        model_flops = flops[(model_name, objective)]
        step_s = median(t["wall_s"])
        sps = batch_size / step_s
        results[label] = {
            "model": model_name, "objective": objective, "mode": mode,
            "step_s_median": step_s, "step_s": t["wall_s"],
            "cpu_s_median": median_or_none(t["cpu_s"]),
            "samples_per_s": sps, "flops_per_sample": model_flops,
            "mfu": mfu(model_flops, sps, peak),
            "compile_s": (max(0.0, compile_s[label] - step_s) if label in compile_s else None),
            "final_loss": float(variants[label].last_loss.float().item()),
        }
        rows.append([label, model_name, objective, mode, step_s, results[label]["cpu_s_median"],
                     sps, 100 * results[label]["mfu"], results[label]["compile_s"]])

    # The headline variants are fixed by --compile before measuring (not the fastest afterwards,
    # which would pick the luckiest of noisy medians).
    suffix = "_compiled" if compile_mode != "none" else ""
    head_itc, head_full = f"ours_itc{suffix}", f"ours_full{suffix}"
    ref = results["hf_clip_itc"]
    summary = {
        "itc_speedup_vs_hf_clip": verdict(results[head_itc]["samples_per_s"]
                                          / ref["samples_per_s"], GOAL_ITC_SPEEDUP),
        "itc_speedup_round_ratio_median": round_ratio_median(timings, "hf_clip_itc", head_itc),
        "itc_speedup_cpu_time": (ref["cpu_s_median"] / results[head_itc]["cpu_s_median"]
                                 if ref["cpu_s_median"] else None),
        "full_step_cost_vs_itc": verdict(results[head_full]["step_s_median"]
                                         / results[head_itc]["step_s_median"], GOAL_FULL_COST,
                                         higher_is_better=False),
        "full_step_cost_round_ratio_median": round_ratio_median(timings, head_full, head_itc),
        "full_step_flop_ratio": flops[("ours", "ITC+ITM+MLM")] / flops[("ours", "ITC")],
        "hf_clip_itc_flops_over_ours": flops[("HF CLIPModel", "ITC")] / flops[("ours", "ITC")],
        "headline_itc_variant": head_itc, "headline_full_variant": head_full,
    }
    if suffix and "ours_itc" in results:
        summary["eager_itc_speedup_vs_hf_clip"] = (results["ours_itc"]["samples_per_s"]
                                                   / ref["samples_per_s"])
    if "hf_clip_itc_compiled" in results and "ours_itc_compiled" in results:
        summary["compiled_itc_speedup_vs_compiled_hf_clip"] = (
            results["ours_itc_compiled"]["samples_per_s"]
            / results["hf_clip_itc_compiled"]["samples_per_s"])

    payload = {
        "benchmark": "train", "environment": environment(device),
        "setup": {"config_name": name, "config": config.to_dict(), "batch": batch_size,
                  "dtype_policy": ("bf16 autocast, fp32 master weights" if args.dtype == "bf16"
                                   else "fp32"),
                  "optimizer": "torch.optim.AdamW(fused=True, lr=1e-4, weight_decay=0.05)",
                  "attention": "SDPA (ours: models.attention sdpa; HF: attn_implementation=sdpa)",
                  "compile": compile_mode, "repeats": repeats, "warmup": warmup,
                  "device": device},
        "peak_flops": {"flops_per_s": peak, "dtype": str(peak_dtype), "source": peak_source},
        "results": results, "summary": summary,
    }
    path = write_json(out_path(args, "train"), payload)

    print(format_table(
        ["variant", "model", "objective", "mode", "step s", "CPU s", "samples/s", "MFU %",
         "compile s"],
        rows, title=(f"bench train: {name} (width {config.width}, depth {config.depth}), batch "
                     f"{batch_size}, {payload['setup']['dtype_policy']}, {device}, median of "
                     f"{repeats}; peak {peak / 1e9:.0f} GFLOP/s ({peak_source})")))
    s = summary
    print(f"ours ITC vs HF CLIP: {s['itc_speedup_vs_hf_clip']['value']:.2f}x samples/s "
          f"(goal >= {GOAL_ITC_SPEEDUP}x: {_met(s['itc_speedup_vs_hf_clip'])}) [{head_itc}; "
          f"per-round median {s['itc_speedup_round_ratio_median']:.2f}x"
          + (f", CPU time {s['itc_speedup_cpu_time']:.2f}x]" if s["itc_speedup_cpu_time"] else "]"))
    print(f"full step / ITC step: {s['full_step_cost_vs_itc']['value']:.2f}x time "
          f"(goal <= {GOAL_FULL_COST}x: {_met(s['full_step_cost_vs_itc'])}; per-round median "
          f"{s['full_step_cost_round_ratio_median']:.2f}x; FLOP ratio "
          f"{s['full_step_flop_ratio']:.2f}x) [{head_full}]")
    print(f"wrote {path}")
    return 0


def _met(v: dict) -> str:
    return "met" if v["met"] else "NOT met"
