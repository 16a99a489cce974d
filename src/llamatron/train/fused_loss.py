"""The output layer and cross entropy fused, chunk by chunk over tokens: full logits never exist.

The plain path (loss.py) materialises logits = h @ W^T for every position in the compute dtype, then an
fp32 copy of the labelled rows, then fp32 gradients of the same size: for Llama 3's 128,256-token
vocabulary at 8,192 tokens per micro-batch that is 2 GiB + 4 GiB + 4 GiB. Here the labelled rows of the
hidden state are cut into chunks of C tokens; for each chunk the logits (C, vocab) are computed, their fp32
log-sum-exp gives the loss, and the gradient of the loss with respect to the logits, softmax - one-hot,
is formed at once and turned into the chunk's gradients for h and W by two matmuls. The chunk's logits are
then dropped, so the extra memory is one chunk (~1.5 GiB at the default C) plus dW. Backward has nothing
left to compute: it only scales the stored gradients by the incoming one (as Liger-Kernel's fused linear
cross entropy does).

Why that is exact: the loss is a weighted sum of token losses, sum_i w_i * CE_i, with weights that do not
depend on the parameters (1 for "token", 1 / labelled tokens of its sequence for "sequence"; loss.py
explains both), so its gradient is known in forward and backward receives one scalar. The arithmetic per
element is the plain path's: logits in the compute dtype, cross entropy in fp32, logit gradients cast
back to the compute dtype for the matmuls. dW is accumulated over chunks in fp32 (on CUDA inside the
matmul, see _accumulate_grad_weight) and cast once.

Under tensor parallelism the vocabulary-parallel loss (parallel/loss_parallel.py) is used instead; it
never gathers the logits either.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from llamatron.train.loss import IGNORE_INDEX, LabelSelection, token_weights

# Chunk logits of ~2**28 elements (1 GiB in fp32): large enough that the (C, hidden) x (hidden, vocab)
# matmuls run at full speed, small enough to be a minor part of a GPU's memory.
_CHUNK_ELEMENTS = 1 << 28


def default_chunk_size(vocab_size: int) -> int:
    """Tokens per chunk: ~2**28 logits, a multiple of 256, between 256 and 16384 (2048 for Llama 3)."""
    return max(256, min(16384, _CHUNK_ELEMENTS // vocab_size // 256 * 256))


def fused_loss_parts(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    kind: str = "sequence",
    document_ids: torch.Tensor | None = None,
    loss_weights: torch.Tensor | None = None,
    selection: LabelSelection | None = None,
    chunk_size: int | None = None,
    compile_backend: str | None = None,
) -> tuple[torch.Tensor, int | float]:
    """loss.loss_parts from the final hidden state and the output weight instead of the logits.
    hidden: (batch, seq, hidden) after the final norm; weight: (vocab, hidden); labels: (batch, seq)
    pre-shifted, -100 masked. loss_weights: (batch, seq) per-token weights taken before the rows were cut
    (context parallelism's slices); then the numerator is sum(weight * token loss) and the denominator
    sum(weight), as cp_batch.slice_loss_parts. selection: the labelled positions and weights worked out
    on the host (loss.label_selection, on hidden's device), used instead of kind and document_ids: the rows
    are then gathered by index and the host never waits for the device here. compile_backend:
    torch.compile the per-chunk loss and gradient (inductor fuses its passes over the chunk's logits into about two); None runs it eagerly.
    Returns (numerator, denominator) as loss_parts does, the numerator a 0-dim fp32 tensor whose backward
    may run once."""
    if selection is not None:
        if loss_weights is not None:
            raise ValueError("fused_loss_parts takes loss_weights or a selection, not both")
        # (n_labelled, hidden); backward adds the gradient back into place
        selected = hidden.flatten(0, 1).index_select(0, selection.index)
        targets = labels.flatten().index_select(0, selection.index)
        weights, count = selection.weights, selection.count
    else:
        if loss_weights is None:
            mask, weights, count = token_weights(labels, kind=kind, document_ids=document_ids)
        else:
            mask = labels != IGNORE_INDEX
            weights = loss_weights[mask].float()
            count = float(weights.sum())
        selected = hidden[mask]  # (n_labelled, hidden); backward scatters the gradient into place
        targets = labels[mask]
    chunk = chunk_size or default_chunk_size(weight.shape[0])
    chunk_fn = _compiled_chunk_fn(compile_backend) if compile_backend else _chunk_loss_and_grad
    if torch.is_grad_enabled() and (selected.requires_grad or weight.requires_grad):
        numerator = _FusedLinearCrossEntropy.apply(selected, weight, targets, weights, chunk, chunk_fn)
    else:  # evaluation: the loss alone, still without full logits
        numerator, _, _ = _chunked(selected, weight, targets, weights, chunk_size=chunk, chunk_fn=chunk_fn,
                                   need_h=False, need_w=False)
    return numerator, count


def use_fused_loss(*, enabled: bool, tp: int, precision: str) -> bool:
    """Whether training.fused_loss applies (config/job.py says why it does not under tp > 1 or fp16)."""
    return enabled and tp == 1 and precision != "fp16"


def _chunk_loss_and_grad(
    logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor, *, grad: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """sum_i w_i * CE_i of one chunk (0-dim fp32), and its gradient with respect to the logits in their
    dtype (None without grad). logits: (C, vocab); targets: (C,); weights: (C,) fp32.

    One fp32 buffer is reused in place for the softmax and the gradient (fewer passes over C x vocab than
    log_softmax + its backward)."""
    z = logits.float() if logits.dtype != torch.float32 else logits.clone()  # (C, vocab) fp32
    row_max = z.amax(dim=-1, keepdim=True)  # (C, 1)
    target_logit = z.gather(-1, targets[:, None])  # (C, 1)
    z.sub_(row_max).exp_()
    sum_exp = z.sum(dim=-1, keepdim=True)  # (C, 1)
    losses = (sum_exp.log() + row_max - target_logit).squeeze(-1)  # (C,) log-sum-exp minus target logit
    loss = (losses * weights).sum()
    if not grad:
        return loss, None
    # d(w_i CE_i)/d logits_i = w_i * (softmax_i - onehot(target_i)).
    z.mul_(weights[:, None] / sum_exp)
    z.scatter_add_(-1, targets[:, None], -weights[:, None])
    return loss, z.to(logits.dtype)


def _chunked(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor, *,
    chunk_size: int, chunk_fn: Callable, need_h: bool, need_w: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """The loss over all chunks and, as asked, its gradients for hidden (n, hidden) and weight (vocab, hidden)."""
    grad = need_h or need_w
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    grad_hidden = torch.empty_like(hidden) if need_h else None
    grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
    for start in range(0, hidden.shape[0], chunk_size):
        end = start + chunk_size
        h = hidden[start:end]  # (C, hidden)
        logits = h @ weight.t()  # (C, vocab) in the compute dtype, as the plain output layer computes them
        loss, grad_logits = chunk_fn(logits, targets[start:end], weights[start:end], grad=grad)
        del logits
        total += loss
        if grad_hidden is not None:
            torch.mm(grad_logits, weight, out=grad_hidden[start:end])
        if grad_weight is not None:
            _accumulate_grad_weight(grad_weight, grad_logits, h)
    if grad_weight is not None:
        grad_weight = grad_weight.to(weight.dtype)
    return total, grad_hidden, grad_weight


def _accumulate_grad_weight(grad_weight: torch.Tensor, grad_logits: torch.Tensor, h: torch.Tensor) -> None:
    """grad_weight (vocab, hidden) fp32 += grad_logits^T (vocab, C) @ h (C, hidden).

    On CUDA with bf16/fp16 inputs the sum is taken in the matmul's own fp32 accumulator (addmm with an fp32
    out_dtype, beta=1): no chunk's partial dW is rounded to the compute dtype, and no separate pass reads
    and writes the fp32 buffer per chunk (for Llama 3's vocabulary ~3 GB of traffic a chunk; in an H200
    profile of the 1B model at micro batch 4 that add took 8 ms a step and is gone, the step itself gained
    0.2-0.9%, within run-to-run noise). Elsewhere (CPU has no such kernel) the chunk's product is added."""
    if grad_logits.dtype == torch.float32:
        grad_weight.addmm_(grad_logits.t(), h)
    elif grad_logits.is_cuda:
        torch.addmm(grad_weight, grad_logits.t(), h, out_dtype=torch.float32, out=grad_weight)
    else:
        grad_weight += grad_logits.t() @ h


def _chunk_loss_and_grad_fusable(
    logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor, *, grad: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """_chunk_loss_and_grad written for the compiler: no in-place update of a (C, vocab) buffer, the one-hot
    term an index comparison, so inductor reads the chunk's logits twice (an online-softmax reduction for
    the row max and sum, then one element-wise pass that writes the gradient in the logits' dtype) and
    never stores an fp32 (C, vocab) tensor. The in-place version made it keep one (scatter_add_ cannot be
    fused): on an H200, 1.0 ms a 2048-token chunk of Llama 3's vocabulary against ~0.4 ms. Same arithmetic
    per element (fp32), up to the order of the one-hot subtraction. Eagerly this would allocate several fp32
    temporaries of the chunk's size; the eager path keeps the in-place function."""
    z = logits.float()  # (C, vocab)
    row_max = z.amax(dim=-1, keepdim=True)  # (C, 1)
    sum_exp = (z - row_max).exp().sum(dim=-1, keepdim=True)  # (C, 1)
    target_logit = z.gather(-1, targets[:, None])  # (C, 1)
    losses = (sum_exp.log() + row_max - target_logit).squeeze(-1)  # (C,)
    loss = (losses * weights).sum()
    if not grad:
        return loss, None
    is_target = torch.arange(z.shape[-1], device=z.device)[None, :] == targets[:, None]  # (C, vocab) bool
    softmax = (z - row_max).exp() / sum_exp
    return loss, ((softmax - is_target.float()) * weights[:, None]).to(logits.dtype)


@functools.cache
def _compiled_chunk_fn(backend: str) -> Callable:
    # One compiled function per backend for the process; the last chunk's shorter length makes the
    # token dimension dynamic after one recompile.
    return torch.compile(_chunk_loss_and_grad_fusable, backend=backend)


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor,
        chunk_size: int, chunk_fn: Callable,
    ) -> torch.Tensor:
        # hidden: (n, hidden), weight: (vocab, hidden) in the compute dtype; targets: (n,); weights: (n,) fp32.
        total, ctx.grad_hidden, ctx.grad_weight = _chunked(
            hidden, weight, targets, weights, chunk_size=chunk_size, chunk_fn=chunk_fn,
            need_h=ctx.needs_input_grad[0], need_w=ctx.needs_input_grad[1],
        )
        return total

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        # The stored gradients are this call's own buffers: scaled in place and handed over (backward runs once).
        grad_hidden, grad_weight = ctx.grad_hidden, ctx.grad_weight
        ctx.grad_hidden = ctx.grad_weight = None
        if grad_hidden is not None:
            grad_hidden.mul_(grad_output)
        if grad_weight is not None:
            grad_weight.mul_(grad_output)
        return grad_hidden, grad_weight, None, None, None, None
