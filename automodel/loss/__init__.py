"""Token cross-entropy that returns (sum, count), so callers can normalise exactly over micro-batches and ranks.

Two ways to the same numbers: `token_cross_entropy` from whole logits, and `linear_cross_entropy` from the final
hidden states and the output head in chunks of tokens, so the (tokens x vocab) logits never exist at once. The
distillation loss (distill.py) has the same two paths; preference.py holds DPO and its family, computed from
per-sequence log-probs (`chunked_token_logps`).
"""

from automodel.loss.cross_entropy import (IGNORE_INDEX, chunked_cross_entropy, chunked_token_logps, count_label_tokens,
                                          linear_cross_entropy, next_token_targets, target_index, token_cross_entropy)
from automodel.loss.distill import chunked_distill, distill_sum

__all__ = ["IGNORE_INDEX", "chunked_cross_entropy", "chunked_distill", "chunked_token_logps", "count_label_tokens",
           "distill_sum",
           "linear_cross_entropy", "next_token_targets", "target_index", "token_cross_entropy"]
