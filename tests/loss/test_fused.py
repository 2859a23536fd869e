"""The fused linear cross-entropy: the loss and every gradient of whole logits, three head matmuls a chunk (the
recomputing path takes four), and never more than one chunk's logits; the same for a LoRA-adapted head and for the
distillation loss."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from automodel.loss import chunked_cross_entropy, distill_sum
from automodel.loss.fused import fused_linear_cross_entropy, fused_linear_loss, linear_head

ROWS, DIM, VOCAB = 37, 16, 101
TRANSFORMS = {"none": lambda x: x, "softcap": lambda x: torch.tanh(x / 3.0) * 3.0, "scale": lambda x: x * 0.5}


def problem(seed: int = 0, bias: bool = True):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(ROWS, DIM, generator=g, dtype=torch.float64).float().requires_grad_()
    weight = (torch.randn(VOCAB, DIM, generator=g) * 0.3).requires_grad_()
    b = (torch.randn(VOCAB, generator=g) * 0.1).requires_grad_() if bias else None
    targets = torch.randint(0, VOCAB, (ROWS,), generator=g)
    return hidden, weight, b, targets


@pytest.mark.parametrize("transform", sorted(TRANSFORMS))
@pytest.mark.parametrize("chunk", [1, 8, 37, 64])
def test_loss_and_gradients_equal_whole_logits(transform, chunk):
    fn = TRANSFORMS[transform]
    hidden, weight, bias, targets = problem()
    want = F.cross_entropy(fn(F.linear(hidden, weight, bias)), targets, reduction="sum")
    want_grads = torch.autograd.grad(want * 0.25, (hidden, weight, bias))  # a step's 1 / N scales the sum
    got = fused_linear_cross_entropy(hidden, weight, bias, targets, fn, chunk)
    got_grads = torch.autograd.grad(got * 0.25, (hidden, weight, bias))
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-7)


def test_a_frozen_head_gets_no_gradient_and_costs_no_weight_matmul():
    hidden, weight, _, targets = problem(bias=False)
    weight.requires_grad_(False)
    got = fused_linear_cross_entropy(hidden, weight, None, targets, TRANSFORMS["none"], 8)
    (grad,) = torch.autograd.grad(got, (hidden,))
    want = torch.autograd.grad(F.cross_entropy(F.linear(hidden, weight), targets, reduction="sum"), (hidden,))[0]
    torch.testing.assert_close(grad, want, rtol=1e-6, atol=1e-7)
    assert head_matmuls(lambda: fused_linear_cross_entropy(hidden, weight, None, targets, TRANSFORMS["none"], 8)) \
        == (2 * 5, VOCAB * 8)  # 5 chunks: logits and the hidden states' gradient


class _Matmuls(TorchDispatchMode):
    """Counts the matrix products and the largest tensor with a vocabulary-sized dimension."""

    def __init__(self):
        super().__init__()
        self.matmuls, self.largest = 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.bmm):
            self.matmuls += 1
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and VOCAB in t.shape and t.dim() == 2 and DIM not in t.shape:
                self.largest = max(self.largest, t.numel())
        return out


def head_matmuls(loss_fn) -> tuple[int, int]:
    """(head matmuls, largest logits tensor) of a loss's forward and backward."""
    with _Matmuls() as seen:
        loss = loss_fn()
        if loss.requires_grad:
            loss.backward()
    return seen.matmuls, seen.largest


def test_three_head_matmuls_a_chunk_against_the_recomputing_paths_four():
    hidden, weight, _, targets = problem(bias=False)
    fused = head_matmuls(lambda: fused_linear_cross_entropy(hidden, weight, None, targets, TRANSFORMS["none"], 8))
    recomputed = head_matmuls(lambda: chunked_cross_entropy(hidden, targets, lambda h: F.linear(h, weight), 8))
    chunks = 5  # 37 rows in chunks of 8
    assert fused == (3 * chunks, 8 * VOCAB) and recomputed == (4 * chunks, 8 * VOCAB)


def test_without_gradients_it_is_the_plain_chunked_sum():
    hidden, weight, bias, targets = problem()
    with torch.no_grad():
        got = fused_linear_cross_entropy(hidden, weight, bias, targets, TRANSFORMS["none"], 8)
        want = chunked_cross_entropy(hidden, targets, lambda h: F.linear(h, weight, bias), 8)
    assert torch.equal(got, want) and not got.requires_grad


def lora_head(bias: bool, seed: int = 0):
    """peft's LoRA Linear (rank 4) over a (DIM -> VOCAB) Linear, its B made non-zero so the adapter counts."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    net = torch.nn.Sequential()
    net.add_module("head", torch.nn.Linear(DIM, VOCAB, bias=bias))
    peft_model = get_peft_model(net, LoraConfig(r=4, lora_alpha=8, target_modules=["head"]))
    module = peft_model.base_model.model.head
    with torch.no_grad():
        module.lora_B["default"].weight.normal_(0, 0.3)
    return module


@pytest.mark.parametrize("bias", [False, True])
def test_a_lora_head_gives_the_loss_and_gradients_of_its_own_forward(bias):
    """LoRA on the output head: the fused head function (base, then the adapter in peft's order) equals the peft
    module's forward, and the fused loss's gradients (hidden states, A and B; none for the frozen base) equal
    autograd's through the module on whole logits."""
    module = lora_head(bias)
    hidden, _, _, targets = problem()
    fn = TRANSFORMS["softcap"]
    head, params = linear_head(module, fn)
    assert len(params) == (4 if bias else 3)
    assert torch.equal(head(hidden, *params), fn(module(hidden)))
    trained = [hidden, module.lora_A["default"].weight, module.lora_B["default"].weight]
    want = F.cross_entropy(fn(module(hidden)), targets, reduction="sum")
    want_grads = torch.autograd.grad(want * 0.25, trained)
    got = fused_linear_loss(hidden, head, params, targets, 8)
    got_grads = torch.autograd.grad(got * 0.25, trained)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-7)
    # Merged or disabled adapters are not a plain LoRA head: the recomputing path takes them.
    module.merge()
    assert linear_head(module, fn) is None
    module.unmerge()
    assert linear_head(module, fn) is not None
    assert linear_head(torch.nn.Sequential(torch.nn.Linear(DIM, VOCAB)), fn) is None


def test_distillation_gives_the_loss_and_gradients_of_whole_logits():
    """The distillation loss as the fused loss's chunk loss, the teacher's logits made per chunk without gradients:
    loss and gradients equal distill_sum on both models' whole logits."""
    hidden, weight, bias, targets = problem()
    teacher_hidden, teacher_weight, teacher_bias, _ = problem(seed=1)
    alpha, temperature = 0.4, 2.0

    def distill_chunk(logits, t, h_teacher):
        with torch.no_grad():
            teacher_logits = F.linear(h_teacher, teacher_weight, teacher_bias)
        return distill_sum(logits, teacher_logits, t, alpha, temperature)

    want = distill_sum(F.linear(hidden, weight, bias), F.linear(teacher_hidden, teacher_weight, teacher_bias).detach(),
                       targets, alpha, temperature)
    want_grads = torch.autograd.grad(want * 0.25, (hidden, weight, bias))
    head = lambda h, w, b: F.linear(h, w, b)  # noqa: E731
    got = fused_linear_loss(hidden, head, (weight, bias), targets, 8, distill_chunk, (teacher_hidden.detach(),))
    got_grads = torch.autograd.grad(got * 0.25, (hidden, weight, bias))
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-7)
