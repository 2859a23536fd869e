"""Token cross-entropy that returns (sum, count), so callers can normalise exactly over micro-batches and ranks.

Two ways to the same numbers: `token_cross_entropy` from whole logits, and `linear_cross_entropy` from the final
hidden states and the output head in chunks of tokens, so the (tokens x vocab) logits never exist at once.
"""

from automodel.loss.cross_entropy import (IGNORE_INDEX, chunked_cross_entropy, count_label_tokens,
                                          linear_cross_entropy, next_token_targets, target_index, token_cross_entropy)

__all__ = ["IGNORE_INDEX", "chunked_cross_entropy", "count_label_tokens", "linear_cross_entropy",
           "next_token_targets", "target_index", "token_cross_entropy"]
