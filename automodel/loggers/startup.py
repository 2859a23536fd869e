"""What a run says before its first step: one line each for the model, the data, the training length, memory, the
optimizer, attention, compilation and where it resumed from. The skeleton gathers the facts; the words are here."""

from pathlib import Path
from typing import Optional

import attrs


@attrs.frozen
class StartupFacts:
    model_class: str
    parameters: int
    trainable: int
    model_note: str  # said after the parameter counts (e.g. what is frozen); "" for nothing
    dtype: str
    device: str
    world_size: int
    backend: str
    quantized: str  # the quantisation's own line; "" without
    data_lines: list[str]
    training_line: str
    activation_checkpointing: bool
    activation_offloading: bool
    loss: str  # how the loss is computed
    optimizer: str
    attention: str
    attention_why: str
    compiled_layers: int
    resumed_from: Optional[Path]
    step: int
    changes: list[str]  # config changes accepted on resume
    stream_line: Optional[str]  # where a resumed stream stands
    debug_log: Optional[Path]  # where the libraries' messages go (None: on the console)


def startup_lines(f: StartupFacts) -> list[str]:
    lines = []
    if f.debug_log is not None:
        lines.append(f"logs: libraries' messages and warnings go to {f.debug_log} (logging.verbose = true shows them "
                     "here)")
    note = f"; {f.model_note}" if f.model_note else ""
    lines.append(f"model: {f.model_class}, {f.parameters:,} parameters ({f.trainable:,} trainable{note}), {f.dtype} on "
                 f"{f.device}; {f.world_size} rank(s), {f.backend} backend")
    if f.quantized:
        lines.append(f.quantized)
    lines += [f"data: {line}" for line in f.data_lines]
    lines.append(f.training_line)
    offload = "; saved activations offloaded to host memory" if f.activation_offloading else ""
    lines.append(f"memory: activation checkpointing {'on' if f.activation_checkpointing else 'off'}{offload}; loss "
                 f"from {f.loss}")
    lines.append(f.optimizer)
    lines.append(f"attention: {f.attention} ({f.attention_why})")
    if f.compiled_layers:
        lines.append(f"compile: {f.compiled_layers} decoder layers compiled with torch.compile (the first step "
                     "compiles them)")
    if f.resumed_from is not None:
        lines.append(f"resumed from {f.resumed_from} at step {f.step}"
                     + (f"; config changed since: {'; '.join(f.changes)}" if f.changes else ""))
        if f.stream_line:
            lines.append(f.stream_line)
    return lines
