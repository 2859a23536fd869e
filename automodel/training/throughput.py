"""How fast the loop trains, counted on the host (no device sync): per log window the tokens/s (non-padding input
tokens over all ranks), ms/step, the padding fraction, TFLOP/s and MFU per device; since the process started, the
padding fraction (run_padding). Evaluations and checkpoints are not step time: a window skips them."""

import contextlib
import time
from typing import Iterator, Optional, Sequence

import torch

from automodel.models import FlopModel

# Dense bf16 peak TFLOP/s of known GPUs (per device, the vendors' data sheets), for MFU. Looked up by the first key
# the device's name contains, so a variant comes before its family: "NVIDIA H100 PCIe" and "NVIDIA H100 NVL" are
# not the SXM part ("NVIDIA H100 80GB HBM3"), and "GB200" is not a "B200".
PEAK_TFLOPS = (("H100 PCIe", 756), ("H100 NVL", 835), ("H100", 989), ("H200", 989), ("H800", 989),
               ("GB200", 2500), ("B200", 2250), ("A100", 312), ("A800", 312), ("L40S", 362), ("L40", 181),
               ("A10G", 125), ("L4", 121), ("4090", 165), ("V100", 125))


def peak_tflops_of(device_name: str) -> Optional[float]:
    """The dense bf16 peak TFLOP/s of a GPU by its CUDA device name; None where unknown."""
    return next((tflops for key, tflops in PEAK_TFLOPS if key in device_name), None)


def peak_flops(device: torch.device, configured_tflops: float) -> Optional[float]:
    """The device's dense bf16 peak in FLOP/s, for MFU; None where unknown (CPU) unless configured."""
    if configured_tflops > 0:
        return configured_tflops * 1e12
    if device.type != "cuda":
        return None
    tflops = peak_tflops_of(torch.cuda.get_device_name(device))
    return tflops * 1e12 if tflops is not None else None


class Throughput:
    """Counts what each step trained on; `window()` gives the log window's rates and starts the next window."""

    def __init__(self, world_size: int, flops: Optional[FlopModel] = None, peak: Optional[float] = None):
        self.world_size, self.flops, self.peak = world_size, flops, peak
        self.run_tokens = self.run_slots = 0
        self._start_window()

    def _start_window(self) -> None:
        self.started, self.tokens, self.slots, self.steps, self.step_flops = time.perf_counter(), 0, 0, 0, 0.0

    def add(self, cpu_batches: Sequence[dict]) -> None:
        """A step's host micro-batches (numpy views: nothing is read from the device)."""
        tokens = sum(int(b["attention_mask"].numpy().sum()) for b in cpu_batches) * self.world_size
        slots = sum(b["input_ids"].numel() for b in cpu_batches) * self.world_size
        self.tokens, self.slots, self.steps = self.tokens + tokens, self.slots + slots, self.steps + 1
        self.run_tokens, self.run_slots = self.run_tokens + tokens, self.run_slots + slots
        if self.flops is not None:  # this rank's work: MFU is per device
            self.step_flops += sum(self.flops.of_batch(b) for b in cpu_batches)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Time spent inside (evaluations, checkpoints) is left out of the window."""
        began = time.perf_counter()
        try:
            yield
        finally:
            self.started += time.perf_counter() - began

    def window(self) -> dict:
        seconds = time.perf_counter() - self.started
        known = self.flops is not None
        rates = {"tokens_per_s": self.tokens / seconds, "ms_per_step": 1000 * seconds / max(self.steps, 1),
                 "tflops": self.step_flops / seconds / 1e12 if known else None,
                 "mfu": self.step_flops / seconds / self.peak if known and self.peak else None,
                 "padding": 1 - self.tokens / max(self.slots, 1), "run_padding": 1 - self.run_tokens / max(self.run_slots, 1)}
        self._start_window()
        return rates
