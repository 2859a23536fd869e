"""The forward's arguments as the host prepares them: a padding mask left out where it changes nothing the loss
reads (no padding; padding after each row's tokens under causal attention), kept where it does, and transformers'
search for packed samples answered from the host, so a forward reads nothing from the device."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from automodel.models.masks import rows_not_packed
from automodel.training.forward import ModelLoss, host_ready, model_inputs, padding_kind
from tests.helpers import random_batch, tiny_llama


class Reads(TorchDispatchMode):
    """Counts the host's reads of tensor values (item(), bool(): aten._local_scalar_dense)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func is torch.ops.aten._local_scalar_dense.default
        return func(*args, **(kwargs or {}))


def test_padding_kind_reads_where_each_rows_padding_lies():
    assert padding_kind(torch.ones(2, 5, dtype=torch.long)) == "none"
    assert padding_kind(torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])) == "trailing"
    assert padding_kind(torch.tensor([[1, 1, 1, 0, 0], [0, 0, 0, 0, 0]])) == "trailing"
    assert padding_kind(torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])) == "other"  # left padding
    assert padding_kind(torch.tensor([[1, 0, 1, 1, 1]])) == "other"  # a hole
    assert padding_kind(torch.ones(1, 1, 5, 5)) == "other"  # a 4-D mask is not a padding mask: kept as it is


@pytest.mark.parametrize("mask, attn, kept", [
    ([[1, 1, 1, 1]], "sdpa", False),
    ([[1, 1, 1, 1]], "flash_attention_2", False),
    ([[1, 1, 1, 0]], "sdpa", False),
    ([[1, 1, 1, 0]], "eager", False),
    ([[1, 1, 1, 0]], "flash_attention_2", True),  # its varlen path skips the padding: worth the mask
    ([[0, 1, 1, 1]], "sdpa", True),
])
def test_the_mask_is_left_out_only_where_the_host_knows_it_changes_nothing(mask, attn, kept):
    mask = torch.tensor(mask)
    batch = host_ready({"input_ids": torch.arange(4)[None] + 3, "attention_mask": mask, "labels": mask * 5 - 100})
    inputs = model_inputs(batch, attn, torch.float32)
    assert ("attention_mask" in inputs) == kept
    assert "padding" not in inputs  # host-side facts are not forward arguments
    # A batch the host did not prepare keeps its mask.
    raw = model_inputs({"input_ids": batch["input_ids"], "attention_mask": mask}, attn, torch.float32)
    assert "attention_mask" in raw


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_the_loss_without_the_mask_equals_the_loss_with_it(attn):
    """Right-padded rows: the summed loss and every gradient equal the masked forward's (the padding positions,
    the only ones that differ, are never trained); unpadded rows: bit for bit."""
    model = tiny_llama()
    model.set_attn_implementation(attn)
    loss = ModelLoss(model, 0, torch.float32)
    padded = random_batch(4, 24, 64, seed=3)
    unpadded = {**random_batch(4, 24, 64, seed=4), "attention_mask": torch.ones(4, 24, dtype=torch.long)}
    unpadded["labels"][:, 12:] = unpadded["input_ids"][:, 12:]
    for batch, exact in ((padded, False), (unpadded, True)):
        results = []
        for prepared in (batch, host_ready(batch)):  # the raw batch keeps its mask
            model.zero_grad()
            total, count = loss(lambda inputs: model(**inputs), prepared)
            total.backward()
            results.append((total.detach(), count, [p.grad.clone() for p in model.parameters()]))
        (masked, n, grads), (unmasked, n2, grads2) = results
        assert n == n2 and host_ready(batch)["padding"] == ("none" if exact else "trailing")
        if exact:
            assert torch.equal(masked, unmasked) and all(torch.equal(a, b) for a, b in zip(grads, grads2))
        else:
            torch.testing.assert_close(unmasked, masked, rtol=1e-6, atol=0)
            for a, b in zip(grads2, grads):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_transformers_reads_nothing_inside_rows_not_packed_and_everything_else_is_unchanged():
    model = tiny_llama()
    ids = torch.arange(3, 19)[None]
    plain = {"input_ids": ids, "use_cache": False}
    with torch.no_grad():
        with Reads() as outside:
            expected = model(**plain).logits
        with Reads() as inside, rows_not_packed(plain):
            got = model(**plain).logits
        assert outside.count >= 1 and inside.count == 0  # transformers' packed-sample search reads outside
        assert torch.equal(got, expected)
        # Packed position ids (two samples of 8) are still found outside the context: the second sample does not
        # see the first, so its logits equal the sample's alone.
        packed = model(input_ids=ids, position_ids=torch.arange(8).repeat(1, 2), use_cache=False).logits
        alone = model(input_ids=ids[:, 8:], use_cache=False).logits
        torch.testing.assert_close(packed[:, 8:], alone, rtol=1e-5, atol=1e-6)
        # Inputs carrying a mask or position ids are left to transformers inside the context too.
        with Reads() as masked, rows_not_packed({**plain, "attention_mask": torch.ones_like(ids)}):
            model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
        assert masked.count >= 1
