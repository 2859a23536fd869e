"""Throughput and MFU, and how a logged step reads on the console."""

from typing import Any, Optional

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


def format_row(row: dict[str, Any], max_steps: int) -> str:
    """`step 20/200 | loss 2.3456 | lr 1.00e-04 | grad_norm 1.234 | 12,345 tok/s | 85.3 ms/step | pad 12% | MFU 3.1%`"""
    if "eval_loss" in row:
        parts = [f"eval @ step {row['step']}/{max_steps}", f"eval_loss {row['eval_loss']:.4f}",
                 f"{row['eval_tokens']:,} tokens"]
        if "exact_match" in row:
            parts.append(f"exact_match {100 * row['exact_match']:.1f}%")
        return " | ".join(parts)
    parts = [f"step {row['step']}/{max_steps}", f"loss {row['loss']:.4f}", f"lr {row['lr']:.2e}",
             f"grad_norm {row['grad_norm']:.3f}", f"{row['tokens_per_s']:,.0f} tok/s",
             f"{row['ms_per_step']:.1f} ms/step", f"pad {100 * row['padding']:.0f}%"]
    if row.get("mfu") is not None:
        parts.append(f"MFU {100 * row['mfu']:.1f}%")
    return " | ".join(parts)
