"""Ring attention (context parallelism) against the plain model's attention core in one process.

The multi-process test runs this file under torchrun (gloo, 4 processes: every case on a ring of 4,
then on two rings of 2): each rank computes the whole-sequence reference with llamatron.model.llama.SDPAttention,
takes its zigzag slice, and compares the ring's output and the gradients of its q, k, v slices.
Cases: causal, packed documents (blocks of one document, mixed blocks, and blocks the mask hides
entirely), GQA and plain multi-head, the math and the fused (aten CPU flash) block kernels.
Tolerance: fp32; the ring sums the softmax in another order, so values agree to 1e-5 relative with an
absolute floor of 1e-6 (measured: at most 5e-7 absolute on values of order 1).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llamatron.parallel.cp import cp_problems, shard_batch, zigzag_indices
from llamatron.parallel.ring_attention import _block_layout, _merge
from tests.conftest import subprocess_env

RTOL, ATOL = 1e-5, 1e-6
REPO = Path(__file__).resolve().parents[3]


# ---- in-process: the layout and the pieces -------------------------------------------------------
def test_zigzag_slices_cover_the_sequence_once():
    for cp in (1, 2, 3, 4):
        parts = [zigzag_indices(8 * cp, cp_rank=r, cp_size=cp) for r in range(cp)]
        assert torch.equal(torch.sort(torch.cat(parts)).values, torch.arange(8 * cp))
    assert zigzag_indices(16, cp_rank=1, cp_size=4).tolist() == [2, 3, 12, 13]


def test_shard_batch_cuts_every_entry_and_adds_positions():
    tokens = torch.arange(24).view(2, 12)
    batch = {"tokens": tokens, "labels": tokens + 100, "document_ids": tokens // 5}
    part = shard_batch(batch, cp_rank=0, cp_size=2)  # chunks 0 and 3 of 4: positions 0-2 and 9-11
    index = [0, 1, 2, 9, 10, 11]
    assert part["tokens"].tolist() == [index, [12 + i for i in index]]
    assert torch.equal(part["labels"], part["tokens"] + 100)
    assert torch.equal(part["document_ids"], part["tokens"] // 5)
    assert part["positions"].tolist() == [index, index]
    packed = shard_batch({**batch, "positions": tokens % 7}, cp_rank=1, cp_size=2)
    assert torch.equal(packed["positions"], packed["tokens"] % 7)  # real positions kept, not replaced
    assert shard_batch(batch, cp_rank=0, cp_size=1) is batch


def test_block_layout_skips_exactly_the_future():
    """Against every source rank, the block covers exactly the (query, key) pairs of the causal mask."""
    for cp in (2, 3, 4):
        seq, local = 4 * cp, 4
        for rank in range(cp):
            q_pos = zigzag_indices(seq, cp_rank=rank, cp_size=cp)
            for source in range(cp):
                k_pos = zigzag_indices(seq, cp_rank=source, cp_size=cp)
                rows, cols, causal = _block_layout(source, rank, local)
                covered = torch.zeros(local, local, dtype=torch.bool)
                covered[rows, cols] = True
                want = q_pos[:, None] >= k_pos[None, :]
                if causal:
                    assert torch.equal(want, torch.ones(local, local, dtype=torch.bool).tril())
                else:
                    assert torch.equal(covered, want), (cp, rank, source)


def test_merge_equals_softmax_over_all_keys():
    scores, values = torch.randn(3, 10), torch.randn(10, 4)
    want = torch.softmax(scores, -1) @ values

    def part(cols):
        lse = torch.logsumexp(scores[:, cols], -1)
        return torch.softmax(scores[:, cols], -1) @ values[cols], lse

    out, lse = torch.zeros(3, 4), torch.full((3,), float("-inf"))
    for cols in (slice(0, 4), slice(4, 10)):
        out, lse = _merge(out, lse, *part(cols))
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
    # A block no query saw (lse -inf, output 0) changes nothing.
    same, _ = _merge(out, lse, torch.zeros(3, 4), torch.full((3,), float("-inf")))
    torch.testing.assert_close(same, out)


def test_cp_problems_lists_every_length():
    found = cp_problems({"training.seq_len": 30, "data.pad_len": 32}, cp=2)
    assert len(found) == 1 and "training.seq_len=30 is not divisible by 2*parallel.cp=4" in found[0]
    found = cp_problems({"training.seq_len": 36}, cp=2, tp=4, sequence_parallel=True)
    assert len(found) == 1 and "use a multiple of 8" in found[0]
    assert cp_problems({"training.seq_len": 48}, cp=2, tp=4, sequence_parallel=True) == []
    assert cp_problems({"training.seq_len": 7}, cp=1) == []


# ---- multi-process: the ring against one process -------------------------------------------------
@pytest.mark.slow  # ~18 s of CPU over 4 processes: about 20 s on 2 cores shared with another test worker
def test_ring_attention_equals_one_process():
    """One launch of 4 processes: every case on a ring of 4, then on two rings of 2 ({0, 1} and {2, 3})."""
    env = subprocess_env()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=4", __file__]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    for cp in (4, 2):
        assert proc.stdout.count(f"ok cp={cp} ") == len(_cases()), proc.stdout


def _cases() -> list[tuple[int, int, str | None, bool]]:
    """(heads, kv_heads, documents, fused)."""
    cases = [(h, g, docs, fused) for h, g in ((4, 2), (2, 2)) for docs in (None, "packed") for fused in (False, True)]
    return cases + [(4, 2, "single", fused) for fused in (False, True)]


def _documents(kind: str, *, seq: int, chunk: int) -> torch.Tensor:
    """(2, seq) document ids. "packed": row 0 has documents of several lengths crossing chunk boundaries
    (mixed blocks); in both rows the first chunk is a document of its own, so the blocks of later
    queries against it are hidden entirely (skipped). "single": one document per row (unmasked blocks)."""
    if kind == "single":
        return torch.stack([torch.zeros(seq, dtype=torch.long), torch.full((seq,), 3)])
    lengths = [chunk, 2, seq // 2 - 3]
    row0 = torch.cat([torch.full((n,), i) for i, n in enumerate([*lengths, seq - sum(lengths)])])
    row1 = (torch.arange(seq) >= chunk).long()
    return torch.stack([row0, row1])


def _run_cases() -> None:
    import torch.distributed as dist

    from llamatron.parallel import ring_attention as ring

    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    rank, world = dist.get_rank(), dist.get_world_size()
    rings = [(dist.new_group(list(range(world))), rank, world)]
    pairs = [dist.new_group([first, first + 1]) for first in range(0, world, 2)]  # every rank creates every group
    rings.append((pairs[rank // 2], rank % 2, 2))
    skipped = []
    block_mask = ring._block_mask

    def counting_block_mask(*args, **kwargs):
        skip, mask = block_mask(*args, **kwargs)
        skipped.append(skip)
        return skip, mask

    ring._block_mask = counting_block_mask
    try:
        for group, cp_rank, cp in rings:
            for case in _cases():
                skipped.clear()
                error = _check_case(ring.ring_attention, group=group, cp_rank=cp_rank, cp=cp, case=case)
                if case[2] == "packed" and cp_rank > 0:  # against rank 0's first chunk: another document
                    assert any(skipped), case
                if cp_rank == 0 and rank == 0:
                    print(f"ok cp={cp} heads={case[0]} kv_heads={case[1]} documents={case[2]} fused={case[3]} "
                          f"max abs error {error:.1e}", flush=True)
    finally:
        dist.destroy_process_group()


def _check_case(ring_attention, *, group, cp_rank: int, cp: int, case: tuple) -> float:
    """The ring's output and q, k, v gradients on this rank's slice against the plain model's attention
    core over the whole sequence; returns the output's largest absolute error."""
    from llamatron.model.llama import SDPAttention, _attention_mask

    heads, kv_heads, docs, fused = case
    batch, seq, dim = 2, 8 * cp, 8
    generator = torch.Generator().manual_seed(heads * 10 + kv_heads)
    q = torch.randn(batch, heads, seq, dim, generator=generator)
    k = torch.randn(batch, kv_heads, seq, dim, generator=generator)
    v = torch.randn(batch, kv_heads, seq, dim, generator=generator)
    grad_out = torch.randn(batch, heads, seq, dim, generator=generator)
    document_ids = _documents(docs, seq=seq, chunk=seq // (2 * cp)) if docs else None
    mask = _attention_mask(document_ids, start=0, seq=seq, device=q.device, cached=False)
    full = [t.clone().requires_grad_() for t in (q, k, v)]
    want = SDPAttention()(*full, mask=mask)
    (want * grad_out).sum().backward()
    index = zigzag_indices(seq, cp_rank=cp_rank, cp_size=cp)
    local = [t[:, :, index].clone().requires_grad_() for t in (q, k, v)]
    local_docs = None if document_ids is None else document_ids[:, index]
    got = ring_attention(*local, group=group, document_ids=local_docs, fused=fused)
    (got * grad_out[:, :, index]).sum().backward()
    name = f"cp={cp} heads={heads} kv_heads={kv_heads} documents={docs} fused={fused}"
    torch.testing.assert_close(got, want[:, :, index], rtol=RTOL, atol=ATOL, msg=name)
    for which, mine, theirs in zip("qkv", local, full, strict=True):
        torch.testing.assert_close(mine.grad, theirs.grad[:, :, index], rtol=RTOL, atol=ATOL, msg=f"{name}: d{which}")
    return (got - want[:, :, index]).abs().max().item()


if __name__ == "__main__":
    _run_cases()
