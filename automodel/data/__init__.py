"""Data: sources (hub or local files), row formats, tokenisation with prompt masking, batch order."""

from automodel.data.batching import BatchPlan, collate, eval_batches
from automodel.data.formats import FORMATS, PROMPT_TEMPLATES, BadRow, Example
from automodel.data.sources import load_rows
from automodel.data.tokenize import IGNORE_INDEX, TokenizedSet, build, load_examples, tokenize_examples

__all__ = ["BatchPlan", "BadRow", "Example", "FORMATS", "IGNORE_INDEX", "PROMPT_TEMPLATES", "TokenizedSet",
           "build", "collate", "eval_batches", "load_examples", "load_rows", "tokenize_examples"]
