"""`vlp bench attention`: models.attention's `sdpa` backend vs `reference`, forward + backward.

Inputs are q, k, v of shape (batch, heads, T, head_dim) with requires_grad, in the dtype under
test (bf16 tensors, not autocast), at sequence lengths of our image/fused sequences (65 = 8x8
patches + CLS, 129, 257 = 16x16 + CLS, 577 = 24x24 + CLS). With `padding` masks each row keeps a
random 50-100% of its keys (text/fused sequences); `none` is the image case. One call = forward
+ backward of a fixed random output gradient. Both backends also get their outputs and input
gradients compared, so the table says the speed-up is for the same result.
"""
from __future__ import annotations

from vlp.pipeline.bench.common import (
    environment,
    format_table,
    interleaved_timings,
    median,
    median_or_none,
    out_path,
    record_figure,
    repeats_for,
    resolve_device,
    set_threads,
    write_json,
)


def add_arguments(p) -> None:
    p.add_argument("--lengths", default="65,129,257,577", help="comma-separated sequence lengths")
    p.add_argument("--dtypes", default="fp32,bf16", help="comma-separated: fp32, bf16, fp16")
    p.add_argument("--masks", default="none,padding", help="comma-separated: none, padding")
    p.add_argument("--batch", type=int, help="default 8 on CPU, 64 on CUDA")
    p.add_argument("--heads", type=int, default=12, help="attention heads")
    p.add_argument("--head-dim", type=int, default=64, help="width of each head")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--sdpa-kernel", default="auto",
                   choices=["auto", "flash", "efficient", "cudnn", "math"],
                   help="restrict the sdpa backend to one torch kernel (CUDA: flash takes no "
                        "mask, so use it with --masks none); auto lets torch choose")


DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def _case(batch, heads, T, head_dim, dtype, mask_kind, device, seed=0):
    import torch

    g = torch.Generator().manual_seed(seed)
    shape = (batch, heads, T, head_dim)
    q, k, v, grad = (torch.randn(shape, generator=g).to(device=device, dtype=dtype)
                     for _ in range(4))
    mask = None
    if mask_kind == "padding":
        keep = torch.randint(T // 2, T + 1, (batch,), generator=g)
        mask = (torch.arange(T)[None, :] < keep[:, None]).to(device)
    return [t.requires_grad_() for t in (q, k, v)], mask, grad


KERNELS = {"flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION",
           "cudnn": "CUDNN_ATTENTION", "math": "MATH"}


def _kernel_context(name: str):
    import contextlib

    if name == "auto":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(getattr(SDPBackend, KERNELS[name]))


def _fwd_bwd(backend: str, qkv, mask, grad, kernel: str = "auto"):
    from vlp.models.attention import attention

    for t in qkv:
        t.grad = None
    with _kernel_context(kernel if backend == "sdpa" else "auto"):
        out = attention(*qkv, key_padding_mask=mask, backend=backend)
    out.backward(grad)
    return out


def _max_diff(a, b) -> float:
    return (a.float() - b.float()).abs().max().item()


def run(args) -> int:
    import torch

    set_threads(args.threads)
    device = resolve_device(args.device)
    lengths = [int(x) for x in args.lengths.split(",")]
    dtypes = args.dtypes.split(",")
    masks = args.masks.split(",")
    batch = args.batch or (64 if device != "cpu" else 8)
    heads, head_dim = args.heads, args.head_dim
    if args.quick:
        lengths, batch, heads, head_dim = [17, 65], 2, 2, 16
    repeats = repeats_for(args, full=15)

    cases, rows = [], []
    for dtype_name in dtypes:
        dtype = getattr(torch, DTYPES[dtype_name])
        for mask_kind in masks:
            for T in lengths:
                qkv, mask, grad = _case(batch, heads, T, head_dim, dtype, mask_kind, device)
                timings = interleaved_timings(
                    {b: (lambda b=b: _fwd_bwd(b, qkv, mask, grad, args.sdpa_kernel))
                     for b in ("sdpa", "reference")},
                    repeats, warmup=1, device=device)
                out_s = _fwd_bwd("sdpa", qkv, mask, grad, args.sdpa_kernel)
                grads_s = [t.grad.clone() for t in qkv]
                out_r = _fwd_bwd("reference", qkv, mask, grad)
                diff = max([_max_diff(out_s, out_r)]
                           + [_max_diff(a, t.grad) for a, t in zip(grads_s, qkv)])
                sdpa_s = median(timings["sdpa"]["wall_s"])
                ref_s = median(timings["reference"]["wall_s"])
                # forward 4 T^2 d per head (scores + weighted sum), backward twice that
                flops = 3 * 4 * batch * heads * T * T * head_dim
                case = {"dtype": dtype_name, "mask": mask_kind, "seq_len": T,
                        "sdpa_s_median": sdpa_s, "reference_s_median": ref_s,
                        "sdpa_cpu_s_median": median_or_none(timings["sdpa"]["cpu_s"]),
                        "reference_cpu_s_median": median_or_none(timings["reference"]["cpu_s"]),
                        "speedup": ref_s / sdpa_s, "sdpa_s": timings["sdpa"]["wall_s"],
                        "reference_s": timings["reference"]["wall_s"],
                        "sdpa_gflops": flops / sdpa_s / 1e9,
                        "reference_gflops": flops / ref_s / 1e9, "max_abs_diff": diff}
                cases.append(case)
                record_figure("attention", device=device, batch=batch,
                              sdpa_kernel=args.sdpa_kernel,
                              **{k: v for k, v in case.items() if not isinstance(v, list)})
                rows.append([dtype_name, mask_kind, T, sdpa_s * 1e3, ref_s * 1e3, case["speedup"],
                             case["sdpa_gflops"], diff])

    payload = {"benchmark": "attention", "environment": environment(device),
               "setup": {"batch": batch, "heads": heads, "head_dim": head_dim,
                         "repeats": repeats, "device": device, "call": "forward + backward",
                         "sdpa_kernel": args.sdpa_kernel},
               "results": cases,
               "summary": {"median_speedup": median([c["speedup"] for c in cases]),
                           "min_speedup": min(c["speedup"] for c in cases)}}
    path = write_json(out_path(args, "attention"), payload)
    print(format_table(
        ["dtype", "mask", "T", "sdpa ms", "reference ms", "speed-up", "sdpa GFLOP/s",
         "max |diff|"], rows,
        title=(f"bench attention: fwd+bwd, batch {batch}, {heads} heads x {head_dim}, {device}, "
               f"median of {repeats}")))
    print(f"sdpa vs reference: median speed-up {payload['summary']['median_speedup']:.2f}x, "
          f"lowest {payload['summary']['min_speedup']:.2f}x")
    print(f"wrote {path}")
    return 0
