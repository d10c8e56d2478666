"""MFU's peak: configured, else the GPU's datasheet figure by its CUDA name, else measured."""
from __future__ import annotations

import pytest
import torch

from vlp.pipeline.train.peak_flops import Peak, datasheet_tflops, known_peak

# What torch.cuda.get_device_name returns on each card -> dense bf16 TFLOP/s on its datasheet.
BF16_PEAKS = {
    "NVIDIA H100 80GB HBM3": 989.0,
    "NVIDIA H100 PCIe": 756.0,
    "NVIDIA H100 NVL": 835.0,
    "NVIDIA H200": 989.0,
    "NVIDIA H200 NVL": 835.0,
    "NVIDIA GH200 480GB": 989.0,
    "NVIDIA A100-SXM4-80GB": 312.0,
    "NVIDIA A100-PCIE-40GB": 312.0,
    "NVIDIA A100 80GB PCIe": 312.0,
    "NVIDIA L40S": 362.0,
    "NVIDIA A10G": 70.0,
    "NVIDIA A10": 125.0,
}


@pytest.mark.parametrize("name, tflops", BF16_PEAKS.items())
def test_a_gpu_is_found_by_its_cuda_name(name, tflops):
    assert datasheet_tflops(name, torch.bfloat16) == tflops
    assert datasheet_tflops(name, torch.float16) == tflops


@pytest.mark.parametrize("name, fp16", [("Tesla V100-SXM2-32GB", 125.0),
                                        ("Tesla V100-PCIE-16GB", 112.0),
                                        ("Tesla V100S-PCIE-32GB", 130.0)])
def test_a_v100_has_an_fp16_peak_and_no_bf16_one(name, fp16):
    assert datasheet_tflops(name, torch.float16) == fp16
    assert datasheet_tflops(name, torch.bfloat16) is None


@pytest.mark.parametrize("name", ["NVIDIA GeForce RTX 4090", "NVIDIA L40", "AMD Instinct MI300X"])
def test_a_gpu_the_table_lacks_has_no_datasheet_peak(name):
    assert datasheet_tflops(name, torch.bfloat16) is None


def test_an_fp32_run_has_no_datasheet_peak():
    """The figures are tensor-core half precision; fp32 on an H100 runs far below 989."""
    assert datasheet_tflops("NVIDIA H100 80GB HBM3", torch.float32) is None


def test_a_configured_peak_overrides_the_datasheet_and_a_cpu_is_measured():
    cpu = torch.device("cpu")
    assert known_peak(312.0, cpu, torch.bfloat16) == Peak(312.0, "logging.peak_tflops")
    assert known_peak(None, cpu, torch.bfloat16) is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_this_gpu_peak_names_its_source():
    device = torch.device("cuda", 0)
    name = torch.cuda.get_device_name(device)
    expected = datasheet_tflops(name, torch.bfloat16)
    peak = known_peak(None, device, torch.bfloat16)
    assert peak == (None if expected is None else
                    Peak(expected, f"datasheet of the {name}, dense bfloat16"))
