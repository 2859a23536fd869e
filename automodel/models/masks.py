"""transformers' attention-mask code, told what the host already knows, so a forward never waits on the device.

Given no attention mask, transformers 5 looks for packed samples in the position ids (masking_utils'
`find_packed_sequence_indices`) and reads its answer on the host: a device sync in every forward, which stalls the
host until the device has run everything queued before it. A forward that gets neither a mask nor position ids from
us has rows that are not packed (the model numbers positions 0, 1, ... itself), so inside `rows_not_packed()` that
search answers "not packed" without reading. Outside it, and for any other caller, transformers' own search runs.
"""

import contextlib
import contextvars
from typing import Iterator, Optional

import torch

_NOT_PACKED = contextvars.ContextVar("automodel_rows_not_packed", default=False)
_installed = False


def _install() -> None:
    """Wraps masking_utils.find_packed_sequence_indices once (if this transformers has it; else there is nothing to
    skip and the host-read test says so)."""
    global _installed
    if _installed:
        return
    _installed = True
    try:
        from transformers import masking_utils
    except ImportError:
        return
    search = getattr(masking_utils, "find_packed_sequence_indices", None)
    if search is None:
        return

    def find_packed_sequence_indices(position_ids: torch.Tensor) -> Optional[torch.Tensor]:
        return None if _NOT_PACKED.get() else search(position_ids)

    masking_utils.find_packed_sequence_indices = find_packed_sequence_indices


@contextlib.contextmanager
def rows_not_packed(inputs: dict) -> Iterator[None]:
    """Around a forward of `inputs` (keyword arguments): when they carry neither an attention mask nor position ids,
    transformers takes the rows as unpacked without reading the device; otherwise nothing changes."""
    if "attention_mask" in inputs or "position_ids" in inputs:
        yield
        return
    _install()
    token = _NOT_PACKED.set(True)
    try:
        yield
    finally:
        _NOT_PACKED.reset(token)
