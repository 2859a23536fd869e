"""The peak table MFU divides by: each GPU found by the name CUDA reports, variants before their family."""

import pytest
import torch

from automodel.training.throughput import peak_flops, peak_tflops_of


@pytest.mark.parametrize("name, tflops", [
    ("NVIDIA H100 80GB HBM3", 989),  # SXM
    ("NVIDIA H100 PCIe", 756),
    ("NVIDIA H100 NVL", 835),
    ("NVIDIA H200", 989),
    ("NVIDIA GH200 480GB", 989),
    ("NVIDIA GB200", 2500),
    ("NVIDIA B200", 2250),
    ("NVIDIA A100-SXM4-80GB", 312),
    ("NVIDIA L40S", 362),
    ("NVIDIA L40", 181),
    ("NVIDIA L4", 121),
    ("Some Future GPU", None),
])
def test_each_gpu_is_found_by_its_cuda_name(name, tflops):
    assert peak_tflops_of(name) == tflops


def test_a_configured_peak_wins_and_a_cpu_has_none():
    cpu = torch.device("cpu")
    assert peak_flops(cpu, 0.0) is None
    assert peak_flops(cpu, 123.0) == 123e12
