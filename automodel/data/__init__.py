"""Data: sources (hub or local files), row formats, tokenisation with masking, caching, packing, batch order."""

from automodel.data.batching import BatchPlan, collate, eval_batches
from automodel.data.formats import (CHAT_TEMPLATES, FORMATS, PROMPT_TEMPLATES, BadRow, Example, FormatOptions,
                                    trained_chat_template)
from automodel.data.packing import block_causal_mask, pack
from automodel.data.sources import load_rows
from automodel.data.mixture import Mixture, build, chain, source_lines
from automodel.data.tokenize import (TokenizedSet, build_sources, format_options, load_examples, source_label,
                                     tokenize_examples, validation_names)
from automodel.data import identity, stream

__all__ = ["BatchPlan", "BadRow", "CHAT_TEMPLATES", "Example", "FORMATS", "FormatOptions",
           "Mixture", "PROMPT_TEMPLATES", "TokenizedSet", "block_causal_mask", "build", "build_sources", "chain",
           "collate", "eval_batches", "format_options", "identity", "stream",
           "load_examples", "load_rows", "pack", "source_label", "source_lines", "tokenize_examples", "trained_chat_template",
           "validation_names"]
