"""Throughput and MFU."""

from typing import Optional

import torch


def peak_flops(device: torch.device, configured_tflops: float) -> Optional[float]:
    """Dense bf16 peak of known GPUs (per device), for MFU; None where unknown (CPU) unless configured."""
    if configured_tflops > 0:
        return configured_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in (("H200", 989), ("H100", 989), ("GH200", 989), ("B200", 2250), ("A100", 312),
                        ("L40S", 362), ("A10G", 125), ("L4", 121), ("4090", 165), ("V100", 125)):
        if key in name:
            return tflops * 1e12
    return None
