"""Losses against direct references; a packed row against its samples run one at a time."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from llamatron.data.packing import IGNORE_INDEX, build_row
from llamatron.model import build_model
from llamatron.train.loss import count_units, loss_parts, per_sequence_losses, pretrain_loss
from tests.conftest import tiny_config

REL_TOL = 1e-5  # fp32, as the acceptance states


def _random_batch(seed: int, *, batch=3, seq=10, vocab=17):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, seq, vocab, generator=g)
    labels = torch.randint(0, vocab, (batch, seq), generator=g)
    labels[torch.rand(batch, seq, generator=g) < 0.4] = IGNORE_INDEX
    return logits, labels


def test_token_loss_matches_cross_entropy():
    logits, labels = _random_batch(0)
    ref = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(pretrain_loss(logits, labels), ref, rtol=REL_TOL, atol=0)
    num, den = loss_parts(logits, labels, kind="token")
    assert den == int((labels != IGNORE_INDEX).sum()) == count_units(labels, kind="token")
    torch.testing.assert_close(num / den, ref, rtol=REL_TOL, atol=0)


def test_sequence_loss_matches_per_document_loop():
    logits, labels = _random_batch(1)
    document_ids = torch.tensor([[0] * 4 + [1] * 6, [0] * 10, [0] * 3 + [1] * 3 + [2] * 4])
    means = []
    for b in range(labels.shape[0]):
        for d in document_ids[b].unique():
            sel = (document_ids[b] == d) & (labels[b] != IGNORE_INDEX)
            if sel.any():
                means.append(F.cross_entropy(logits[b][sel], labels[b][sel]))
    num, den = loss_parts(logits, labels, kind="sequence", document_ids=document_ids)
    assert den == len(means) == count_units(labels, kind="sequence", document_ids=document_ids)
    torch.testing.assert_close(num, torch.stack(means).sum(), rtol=REL_TOL, atol=0)
    # Without document ids every row is one sequence.
    rows = [F.cross_entropy(logits[b][labels[b] != IGNORE_INDEX], labels[b][labels[b] != IGNORE_INDEX]) for b in range(3)]
    num, den = loss_parts(logits, labels, kind="sequence")
    assert den == 3
    torch.testing.assert_close(num, torch.stack(rows).sum(), rtol=REL_TOL, atol=0)


def test_gradient_accumulation_equals_whole_batch():
    logits, labels = _random_batch(2, batch=4)
    docs = torch.tensor([[0] * 5 + [1] * 5] * 4)
    whole = logits.clone().requires_grad_(True)
    num, den = loss_parts(whole, labels, kind="sequence", document_ids=docs)
    (num / den).backward()
    split = logits.clone().requires_grad_(True)
    global_count = sum(count_units(labels[i : i + 2], document_ids=docs[i : i + 2]) for i in (0, 2))
    for i in (0, 2):
        part, _ = loss_parts(split[i : i + 2], labels[i : i + 2], document_ids=docs[i : i + 2])
        (part / global_count).backward()
    torch.testing.assert_close(split.grad, whole.grad, rtol=REL_TOL, atol=1e-9)


def _samples(vocab: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Three samples (ids, pre-shifted labels) with a masked prompt and a trained answer each."""
    rng = np.random.default_rng(0)
    out = []
    for length, prompt in ((7, 3), (5, 2), (9, 4)):
        ids = rng.integers(3, vocab, size=length)
        labels = np.full(length, IGNORE_INDEX)
        labels[prompt - 1 : -1] = ids[prompt:]
        out.append((ids, labels))
    return out


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return build_model(tiny_config(), seed=7)


def test_packed_row_equals_samples_one_at_a_time(tiny_model):
    samples = _samples(tiny_model.config.vocab_size)
    row = build_row(samples, seq_len=24, pad_id=0).item()  # 21 tokens + a 3-token padding document
    batch = {k: torch.as_tensor(v)[None] for k, v in row.items()}

    tiny_model.zero_grad()
    logits = tiny_model(batch["tokens"], positions=batch["positions"], document_ids=batch["document_ids"])
    packed = per_sequence_losses(logits, batch["labels"], document_ids=batch["document_ids"])
    num, den = loss_parts(logits, batch["labels"], document_ids=batch["document_ids"])
    assert den == 3
    (num / den).backward()
    packed_grads = {n: p.grad.clone() for n, p in tiny_model.named_parameters()}

    tiny_model.zero_grad()
    alone = []
    for ids, labels in samples:
        logits = tiny_model(torch.as_tensor(ids)[None])  # its own positions 0..n-1, plain causal attention
        alone.append(F.cross_entropy(logits[0].float(), torch.as_tensor(labels), ignore_index=IGNORE_INDEX))
    (torch.stack(alone).sum() / 3).backward()

    torch.testing.assert_close(packed, torch.stack(alone).detach(), rtol=REL_TOL, atol=0)
    for name, param in tiny_model.named_parameters():
        torch.testing.assert_close(packed_grads[name], param.grad, rtol=1e-4, atol=1e-7, msg=name)


def test_packed_attention_is_isolated(tiny_model):
    """Changing one sample's tokens leaves the other samples' logits unchanged (and breaks without ids)."""
    samples = _samples(tiny_model.config.vocab_size)
    row = {k: torch.as_tensor(v)[None] for k, v in build_row(samples, seq_len=24, pad_id=0).item().items()}
    changed = row["tokens"].clone()
    changed[0, :7] = (changed[0, :7] + 1) % tiny_model.config.vocab_size  # sample 0 only
    with torch.no_grad():
        a = tiny_model(row["tokens"], positions=row["positions"], document_ids=row["document_ids"])
        b = tiny_model(changed, positions=row["positions"], document_ids=row["document_ids"])
        c = tiny_model(row["tokens"], positions=row["positions"])
        d = tiny_model(changed, positions=row["positions"])
    torch.testing.assert_close(a[0, 7:], b[0, 7:], rtol=0, atol=0)
    assert (c[0, 7:] - d[0, 7:]).abs().max() > 1e-4
