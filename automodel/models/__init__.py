"""Models and tokenizers: hub ids, local dirs, or architectures built from config."""

from automodel.models.build import (build_model, build_tokenizer, check_model, compile_layers, count_params,
                                    enable_activation_checkpointing, pick_attention, vocab_size)
from automodel.models.tensors import DTYPES, HF_LOAD, numel
from automodel.models import quantize
from automodel.models.flops import FlopModel, flop_model
from automodel.models.card import model_card
from automodel.models.export import save_hf_model
from automodel.models.tokenizers import byte_level_tokenizer

__all__ = ["DTYPES", "HF_LOAD", "build_model", "build_tokenizer", "byte_level_tokenizer", "check_model", "compile_layers", "count_params",
           "enable_activation_checkpointing", "FlopModel", "flop_model", "model_card", "numel", "pick_attention", "quantize", "save_hf_model",
           "vocab_size"]
