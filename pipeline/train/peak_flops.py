"""The peak FLOP/s that MFU divides by: `logging.peak_tflops` when set, else the datasheet's dense
peak of the GPU training runs on, else None (the trainer then measures one, metrics.py).

Datasheet figures are dense tensor-core throughput (NVIDIA prints sparse figures, twice these, in
the same tables) in bf16 with fp32 accumulation; the V100 has no bf16, its figure is fp16. They
hold for half-precision training only: an fp32 run's peak is measured.
"""
from __future__ import annotations

import re
from typing import NamedTuple

import torch

HALF = (torch.bfloat16, torch.float16)
FP16 = (torch.float16,)

# (words of the CUDA device name, dense TFLOP/s, dtypes it holds for). First match wins, so a
# variant (PCIe, NVL) comes before its plain name.
DATASHEET = (
    (("h100", "pcie"), 756.0, HALF),  # H100 PCIe: 1,513 sparse
    (("h100", "nvl"), 835.0, HALF),  # H100 NVL, per GPU: 1,671 sparse
    (("h200", "nvl"), 835.0, HALF),  # H200 NVL: 1,671 sparse
    (("h100",), 989.0, HALF),  # H100 SXM ("NVIDIA H100 80GB HBM3"): 1,979 sparse
    (("h200",), 989.0, HALF),  # H200 SXM: 1,979 sparse
    (("gh200",), 989.0, HALF),  # GH200's GPU is an H100 SXM
    (("a100",), 312.0, HALF),  # SXM and PCIe alike: 624 sparse
    (("l40s",), 362.0, HALF),  # 362.05; 733 sparse
    (("a10g",), 70.0, HALF),  # AWS's A10G datasheet: 140 sparse (not the A10's 125)
    (("a10",), 125.0, HALF),  # A10: 250 sparse
    (("v100", "pcie"), 112.0, FP16),  # V100 PCIe
    (("v100s",), 130.0, FP16),  # V100S PCIe
    (("v100",), 125.0, FP16),  # V100 SXM2
)


class Peak(NamedTuple):
    """A per-device peak and where it came from (said in the run's log)."""

    tflops: float
    source: str


def datasheet_tflops(device_name: str, dtype: torch.dtype) -> float | None:
    """The dense datasheet peak of a CUDA device by its name (torch.cuda.get_device_name) for
    training in `dtype`; None for a device not in the table or a dtype the figure is not for."""
    words = set(re.split(r"[^a-z0-9]+", device_name.lower()))
    for needed, tflops, dtypes in DATASHEET:
        if words.issuperset(needed):
            return tflops if dtype in dtypes else None
    return None


def known_peak(configured_tflops: float | None, device: torch.device,
               dtype: torch.dtype) -> Peak | None:
    """The configured peak, else the device's datasheet peak; None when it must be measured."""
    if configured_tflops is not None:
        return Peak(configured_tflops, "logging.peak_tflops")
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    tflops = datasheet_tflops(name, dtype)
    if tflops is None:
        return None
    return Peak(tflops, f"datasheet of the {name}, dense {str(dtype).removeprefix('torch.')}")
