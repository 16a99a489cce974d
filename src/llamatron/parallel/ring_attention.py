"""Ring attention: exact causal attention over a sequence split across a context-parallel group.

Layout ("zigzag", as Megatron-Core and torch's context_parallel balance causal work): the sequence is
cut into 2*cp equal chunks and rank r holds chunks r and 2*cp-1-r, concatenated, so its local order is
the global order (llamatron.parallel.cp.shard_batch cuts batches this way).

Forward: the K/V blocks and their document ids travel around the ring. At step i rank r holds those of
rank s = (r - i) mod cp; the next block is sent/received while the current one is computed. Each
block gives a partial output and its log-sum-exp; partials merge with the online softmax. Causally:
- s == r: both local chunks against both, causal (local order is global order);
- s <  r: every query against s's first chunk (s < r < 2cp-1-r), unmasked; s's second chunk
  (2cp-1-s > 2cp-1-r) is entirely in the future;
- s >  r: only the second local chunk (2cp-1-r) against both of s's chunks, unmasked; the first
  local chunk r precedes both.
Every step but the first is half a block, the same on every rank. Document ids (packed SFT) add a
same-document mask; a block the mask hides completely is skipped.

Backward (flash-attention style, from the final output and log-sum-exp): K/V travel the ring again and
each rank's dK/dV accumulator travels with them, gathering every rank's contribution and arriving back
at its owner after the last step. dK/dV travel in fp32.

Block kernel: a plain math kernel (fp32 scores; CPU and CUDA, any mask), or a fused kernel that returns
the log-sum-exp: on CPU aten's flash kernel (any mask), on CUDA the flash kernel for bf16/fp16 blocks
without a document mask. Both give the same numbers within rounding (tests/unit/parallel/test_ring_attention.py).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

aten = torch.ops.aten


def ring_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    group: dist.ProcessGroup,
    document_ids: torch.Tensor | None = None,
    fused: bool = True,
) -> torch.Tensor:
    """Causal attention of this rank's queries against the whole sequence held by `group`.

    q: (batch, heads, local_seq, head_dim); k, v: (batch, kv_heads, local_seq, head_dim) (GQA: heads a
    multiple of kv_heads); local_seq = seq / cp, the rank's zigzag chunks. document_ids: (batch, local_seq)
    or None; attention stays within equal ids. fused: use a fused block kernel where one applies.
    Returns (batch, heads, local_seq, head_dim) in q's dtype, scale 1/sqrt(head_dim) as SDPA."""
    if q.shape[2] % 2:
        raise ValueError(f"the local sequence ({q.shape[2]}) must be two equal chunks")
    return _RingAttention.apply(q, k, v, document_ids, group, fused)


class _Ring:
    """Point-to-point exchange with the ring neighbours: send to rank+1, receive from rank-1."""

    def __init__(self, group: dist.ProcessGroup) -> None:
        self.group = group
        self.rank, self.size = dist.get_rank(group), dist.get_world_size(group)
        self.next = dist.get_global_rank(group, (self.rank + 1) % self.size)
        self.prev = dist.get_global_rank(group, (self.rank - 1) % self.size)

    def exchange(self, tensors: list[torch.Tensor], *, tag: int) -> _Transfer:
        """Start sending `tensors` to the next rank and receiving as many from the previous one.
        Distinct tags keep concurrent streams (K/V and the dK/dV accumulators) apart on gloo; NCCL
        matches them by issue order, which is the same on every rank."""
        if self.size == 1:  # the ring is this rank alone
            return _Transfer(sent=[], received=tensors, requests=[])
        received = [torch.empty_like(t) for t in tensors]
        ops = []
        for index, (send, recv) in enumerate(zip(tensors, received, strict=True)):
            ops.append(dist.P2POp(dist.isend, send, self.next, self.group, tag + index))
            ops.append(dist.P2POp(dist.irecv, recv, self.prev, self.group, tag + index))
        return _Transfer(sent=tensors, received=received, requests=dist.batch_isend_irecv(ops))


class _Transfer:
    """Sends and receives in flight. It holds the sent tensors until they are out: the caller may drop
    its own references (the accumulators are rebuilt every step)."""

    def __init__(self, *, sent: list[torch.Tensor], received: list[torch.Tensor], requests: list) -> None:
        self.sent, self.received, self.requests = sent, received, requests

    def wait(self) -> list[torch.Tensor]:
        for request in self.requests:
            request.wait()
        self.sent = []
        return self.received


_KV_TAG, _GRAD_TAG = 100, 200


def _block_layout(source: int, rank: int, local: int) -> tuple[slice, slice, bool]:
    """(query rows, key rows, causal) of the block against `source`'s K/V (module docstring)."""
    half = local // 2
    if source == rank:
        return slice(0, local), slice(0, local), True
    if source < rank:
        return slice(0, local), slice(0, half), False
    return slice(half, local), slice(0, local), False


def _rows(ids: torch.Tensor | None, part: slice) -> torch.Tensor | None:
    return None if ids is None else ids[:, part]


def _block_mask(
    q_docs: torch.Tensor | None, k_docs: torch.Tensor | None, *, causal: bool
) -> tuple[bool, torch.Tensor | None]:
    """(skip, mask) for one block: mask (batch, 1, q, k) True = attend, None where the block is plain
    causal / unmasked (every id the same), skip where no query sees any key."""
    if q_docs is None:
        return False, None
    first = q_docs[:, :1]
    if bool((q_docs == first).all()) and bool((k_docs == first).all()):
        return False, None
    mask = q_docs[:, :, None] == k_docs[:, None, :]  # (batch, q, k)
    if causal:
        mask = mask & torch.ones(mask.shape[-2:], dtype=torch.bool, device=mask.device).tril()
    if not bool(mask.any()):
        return True, None
    return False, mask[:, None]


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, document_ids, group, fused):
        ring = _Ring(group)
        local = q.shape[2]
        kernel = _kernel_for(q, fused=fused)
        out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)  # (batch, heads, local, head_dim)
        lse = torch.full(q.shape[:3], float("-inf"), dtype=torch.float32, device=q.device)  # (batch, heads, local)
        kv, docs = torch.stack([k, v]), document_ids  # (2, batch, kv_heads, local, head_dim)
        for step in range(ring.size):
            source = (ring.rank - step) % ring.size
            if step + 1 < ring.size:
                transfer = ring.exchange([kv] if docs is None else [kv, docs], tag=_KV_TAG)
            rows, cols, causal = _block_layout(source, ring.rank, local)
            skip, mask = _block_mask(_rows(document_ids, rows), _rows(docs, cols), causal=causal)
            if not skip:
                block_out, block_lse = kernel.forward(q[:, :, rows], kv[0][:, :, cols], kv[1][:, :, cols],
                                                      mask=mask, causal=causal)
                out[:, :, rows], lse[:, :, rows] = _merge(out[:, :, rows], lse[:, :, rows], block_out, block_lse)
            if step + 1 < ring.size:
                kv, *rest = transfer.wait()
                docs = rest[0] if rest else None
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse, document_ids)
        ctx.group, ctx.fused = group, fused
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse, document_ids = ctx.saved_tensors
        ring = _Ring(ctx.group)
        local = q.shape[2]
        kernel = _kernel_for(q, fused=ctx.fused)
        grad_out = grad_out.contiguous()
        grad_q = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        kv, docs = torch.stack([k, v]), document_ids
        grad_transfer = None
        for step in range(ring.size):
            source = (ring.rank - step) % ring.size
            if step + 1 < ring.size:
                transfer = ring.exchange([kv] if docs is None else [kv, docs], tag=_KV_TAG)
            rows, cols, causal = _block_layout(source, ring.rank, local)
            skip, mask = _block_mask(_rows(document_ids, rows), _rows(docs, cols), causal=causal)
            # The accumulator of `source`'s dK/dV: (2, batch, kv_heads, local, head_dim) fp32.
            grad_kv = torch.zeros(kv.shape, dtype=torch.float32, device=q.device)
            if not skip:
                dq, dk, dv = kernel.backward(
                    grad_out[:, :, rows], q[:, :, rows], kv[0][:, :, cols], kv[1][:, :, cols], out[:, :, rows],
                    lse[:, :, rows], mask=mask, causal=causal,
                )
                grad_q[:, :, rows] += dq
                grad_kv[0][:, :, cols] += dk
                grad_kv[1][:, :, cols] += dv
            if grad_transfer is not None:  # what the ranks before this one added for the same source
                grad_kv += grad_transfer.wait()[0]
            grad_transfer = ring.exchange([grad_kv], tag=_GRAD_TAG)
            if step + 1 < ring.size:
                kv, *rest = transfer.wait()
                docs = rest[0] if rest else None
        # The accumulator that arrives after the last step is this rank's own, complete.
        (grad_kv,) = grad_transfer.wait()
        grad_k, grad_v = grad_kv[0].to(k.dtype), grad_kv[1].to(v.dtype)
        return grad_q.to(q.dtype), grad_k, grad_v, None, None, None


def _merge(
    out: torch.Tensor, lse: torch.Tensor, block_out: torch.Tensor, block_lse: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Online softmax: combine two partial attentions over disjoint keys. out (..., q, d), lse (..., q);
    a row that saw no key yet has lse -inf and contributes nothing (no NaN: the new lse is finite
    wherever either side is, and fully masked rows of a block carry out 0)."""
    new_lse = torch.logaddexp(lse, block_lse.float())
    safe = torch.where(torch.isinf(new_lse), torch.zeros_like(new_lse), new_lse)
    new_out = out * torch.exp(lse - safe)[..., None] + block_out.float() * torch.exp(block_lse.float() - safe)[..., None]
    return new_out, new_lse


# ---- block kernels -------------------------------------------------------------------------------
def _expand_kv(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(batch, kv_heads, s, d) -> (batch, heads, s, d): query head h uses KV head h // (heads / kv_heads),
    as SDPA's enable_gqa and HF's repeat_kv."""
    return x if x.shape[1] == heads else x.repeat_interleave(heads // x.shape[1], dim=1)


def _reduce_kv(grad: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """The gradient of _expand_kv: sum each KV head's query group. (batch, heads, s, d) -> (batch, kv_heads, s, d)."""
    batch, heads, seq, dim = grad.shape
    return grad if heads == kv_heads else grad.view(batch, kv_heads, heads // kv_heads, seq, dim).sum(2)


def _causal_mask(mask: torch.Tensor | None, q_len: int, k_len: int, device: torch.device) -> torch.Tensor:
    causal = torch.ones(q_len, k_len, dtype=torch.bool, device=device).tril()
    return causal if mask is None else mask & causal


class MathKernel:
    """Scores in fp32 through matmuls; works everywhere and takes any mask."""

    def forward(self, q, k, v, *, mask, causal):
        scale = q.shape[-1] ** -0.5
        k, v = _expand_kv(k, q.shape[1]), _expand_kv(v, q.shape[1])
        scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale  # (batch, heads, q, k)
        if causal:
            mask = _causal_mask(mask, q.shape[2], k.shape[2], q.device)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        lse = torch.logsumexp(scores, dim=-1)  # (batch, heads, q); -inf for rows that see no key
        probs = torch.exp(scores - torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)[..., None])
        return torch.matmul(probs, v.float()), lse

    def backward(self, grad_out, q, k, v, out, lse, *, mask, causal):
        """Gradients of this block's share, from the final output and log-sum-exp (fp32)."""
        scale = q.shape[-1] ** -0.5
        kv_heads = k.shape[1]
        k, v = _expand_kv(k, q.shape[1]).float(), _expand_kv(v, q.shape[1]).float()
        q, grad_out = q.float(), grad_out.float()
        scores = torch.matmul(q, k.transpose(-1, -2)) * scale
        if causal:
            mask = _causal_mask(mask, q.shape[2], k.shape[2], q.device)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        probs = torch.exp(scores - lse[..., None])  # (batch, heads, q, k); the final softmax's entries
        delta = (grad_out * out.float()).sum(-1, keepdim=True)  # (batch, heads, q, 1)
        grad_v = torch.matmul(probs.transpose(-1, -2), grad_out)
        grad_scores = probs * (torch.matmul(grad_out, v.transpose(-1, -2)) - delta)
        grad_q = torch.matmul(grad_scores, k) * scale
        grad_k = torch.matmul(grad_scores.transpose(-1, -2), q) * scale
        return grad_q, _reduce_kv(grad_k, kv_heads), _reduce_kv(grad_v, kv_heads)


class CPUFlashKernel:
    """aten's CPU flash-attention kernel, which returns the log-sum-exp and takes a boolean mask."""

    def forward(self, q, k, v, *, mask, causal):
        k, v = _expand_kv(k, q.shape[1]), _expand_kv(v, q.shape[1])
        if causal and mask is not None:
            mask, causal = _causal_mask(mask, q.shape[2], k.shape[2], q.device), False
        out, lse = aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, attn_mask=_bias(mask, q))
        if mask is not None:
            # A row that sees no key: the kernel's output there is not defined; it contributes nothing.
            empty = ~mask.any(-1)  # (batch, 1, q)
            out = out.masked_fill(empty[..., None], 0.0)
            lse = lse.masked_fill(empty, float("-inf"))
        return out, lse

    def backward(self, grad_out, q, k, v, out, lse, *, mask, causal):
        kv_heads = k.shape[1]
        k, v = _expand_kv(k, q.shape[1]), _expand_kv(v, q.shape[1])
        if causal and mask is not None:
            mask, causal = _causal_mask(mask, q.shape[2], k.shape[2], q.device), False
        grad_q, grad_k, grad_v = aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad_out, q, k, v, out, lse.contiguous(), 0.0, causal, attn_mask=_bias(mask, q)
        )
        return grad_q.float(), _reduce_kv(grad_k.float(), kv_heads), _reduce_kv(grad_v.float(), kv_heads)


def _bias(mask: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
    """A boolean mask as the additive bias the CPU flash kernel takes (0 = attend, -inf = not)."""
    if mask is None:
        return None
    return torch.zeros(mask.shape, dtype=like.dtype, device=like.device).masked_fill_(~mask, float("-inf"))


class CUDAFlashKernel(MathKernel):
    """The CUDA flash kernel for bf16/fp16 blocks without a document mask; masked blocks use the math
    kernel. Same contract as CPUFlashKernel, whose use is tested on CPU; these CUDA calls are checked on
    GPUs by bench/cp_check.py."""

    def forward(self, q, k, v, *, mask, causal):
        if mask is not None:
            return super().forward(q, k, v, mask=mask, causal=causal)
        k, v = _expand_kv(k, q.shape[1]), _expand_kv(v, q.shape[1])
        out, lse, *_ = aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal)
        return out, lse

    def backward(self, grad_out, q, k, v, out, lse, *, mask, causal):
        if mask is not None:
            return super().backward(grad_out, q, k, v, out, lse, mask=mask, causal=causal)
        kv_heads = k.shape[1]
        k, v = _expand_kv(k, q.shape[1]), _expand_kv(v, q.shape[1])
        # Cumulative lengths None (undefined): the dense, not the variable-length, kernel. Without
        # dropout the RNG state is not read.
        rng = torch.empty(0, dtype=torch.int64, device=q.device)
        grad_q, grad_k, grad_v = aten._scaled_dot_product_flash_attention_backward(
            grad_out, q, k, v, out, lse.contiguous(), None, None, q.shape[2], k.shape[2], 0.0, causal, rng, rng
        )
        return grad_q.float(), _reduce_kv(grad_k.float(), kv_heads), _reduce_kv(grad_v.float(), kv_heads)


def _kernel_for(q: torch.Tensor, *, fused: bool) -> MathKernel | CPUFlashKernel:
    if not fused:
        return MathKernel()
    if q.device.type == "cpu":
        return CPUFlashKernel()
    if q.device.type == "cuda" and q.dtype in (torch.bfloat16, torch.float16) and q.shape[-1] <= 256:
        return CUDAFlashKernel()
    return MathKernel()
