"""Tensors as byte ranges of Megatron-Core shard files (checkpoint/stored.py), the path mcore-to-hf
takes: every range must give exactly the bytes the in-memory merge (keymaps.merge_layer) gives,
through the kernel copy, its memory fallback, and a dtype change. Exact equality throughout."""

from __future__ import annotations

import argparse
import errno
import os
import shutil

import pytest
import torch

from llamatron.checkpoint import convert, mcore, stored
from llamatron.checkpoint.hf import HFCheckpointWriter, hf_name, save_hf_model
from llamatron.errors import LlamatronError
from llamatron.model import build_model
from tests.conftest import tiny_config


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """Untied and tied tiny models (GQA, a vocabulary TP 4 pads) converted at TP 2 x PP 2 and TP 4 x PP 1."""
    root = tmp_path_factory.mktemp("stored")
    for tied in (False, True):
        config = tiny_config(num_layers=4, num_kv_heads=4, vocab_size=250, tie_word_embeddings=tied)
        hf = root / f"hf-{tied}"
        save_hf_model(build_model(config, seed=3), hf, dtype=torch.bfloat16)
        convert.hf_to_mcore(hf, root / f"m-{tied}-22", tp=2, pp=2, pad_vocab_multiple=8)
        convert.hf_to_mcore(hf, root / f"m-{tied}-41", tp=4, pp=1, layout="mcore-local")
    return root


CHECKPOINTS = [f"m-{tied}-{split}" for tied in (False, True) for split in ("22", "41")]


def _write_read(tensor: stored.StoredTensor, path, *, dtype: torch.dtype, prefix: int = 24) -> torch.Tensor:
    """write_into a file after `prefix` junk bytes, then read the tensor back."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.pwrite(fd, b"x" * prefix, 0)
        tensor.write_into(fd, prefix, dtype=dtype, scratch=stored.Scratch())
    finally:
        os.close(fd)
    data = bytearray(path.read_bytes()[prefix:])
    return torch.frombuffer(data, dtype=dtype).view(tensor.shape)


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_ranges_give_the_merged_tensors(source, name, tmp_path):
    reader = mcore.McoreCheckpointReader(source / name)
    merged = dict(reader.tensors())
    ranges = dict(reader.stored_tensors())
    assert list(ranges) == list(merged)  # same names, same (HF) order
    for key, tensor in ranges.items():
        assert isinstance(tensor, stored.StoredTensor), key  # no fallback to merging for zip files
        assert torch.equal(tensor.read(), merged[key]), key
        assert torch.equal(_write_read(tensor, tmp_path / "t", dtype=torch.bfloat16), merged[key]), key
        as_fp32 = _write_read(tensor, tmp_path / "t", dtype=torch.float32)
        assert torch.equal(as_fp32, merged[key].float()), key


def test_memory_fallback_in_small_chunks(source, tmp_path, monkeypatch):
    """Without copy_file_range (another filesystem), row ranges go through memory; a chunk smaller
    than a tensor and not a multiple of its rows exercises the chunk boundaries."""

    def refuse(*args, **kwargs):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "copy_file_range", refuse)
    monkeypatch.setattr(stored, "CHUNK_BYTES", 1000)
    reader = mcore.McoreCheckpointReader(source / "m-False-22")
    merged = dict(reader.tensors())
    for key, tensor in reader.stored_tensors():
        for dtype in (torch.bfloat16, torch.float16):
            assert torch.equal(_write_read(tensor, tmp_path / "t", dtype=dtype), merged[key].to(dtype)), key


def test_output_files_are_byte_identical_to_writing_merged_tensors(source, tmp_path):
    """mcore_to_hf (byte ranges) writes the same files as the writer fed merged tensors."""
    m = source / "m-False-22"
    convert.mcore_to_hf(m, tmp_path / "ranges", max_shard_bytes=40_000)
    reader = mcore.McoreCheckpointReader(m)
    with HFCheckpointWriter(tmp_path / "merged", config=reader.config, dtype=reader.dtype,
                            tokenizer=convert.default_tokenizer(m, vocab_size=reader.config.vocab_size),
                            max_shard_bytes=40_000) as writer:
        for name, tensor in reader.tensors():
            writer.write(hf_name(name), tensor)
    files = sorted(p.name for p in (tmp_path / "merged").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "ranges").iterdir())
    assert sum(f.endswith(".safetensors") for f in files) > 2  # several shards
    for file in files:
        assert (tmp_path / "ranges" / file).read_bytes() == (tmp_path / "merged" / file).read_bytes(), file


def _resave(src_dir, dst_dir, transform):
    shutil.copytree(src_dir, dst_dir)
    for path in (dst_dir / "release").glob("*/model_optim_rng.pt"):
        with torch.serialization.safe_globals([argparse.Namespace]):
            shard = torch.load(path, weights_only=True)
        transform(shard, path)


def test_views_into_one_buffer_as_megatron_saves_them(source, tmp_path):
    """Megatron's DDP keeps parameters as views of one flat buffer; torch.save then writes that
    buffer once and each tensor is an offset into it."""

    def into_one_buffer(shard, path):
        tensors = {k: v for k, v in shard["model"].items() if isinstance(v, torch.Tensor)}
        flat = torch.cat([torch.zeros(5, dtype=torch.bfloat16), *(t.reshape(-1) for t in tensors.values())])
        position = 5
        for key, tensor in tensors.items():
            shard["model"][key] = flat[position : position + tensor.numel()].view(tensor.shape)
            position += tensor.numel()
        torch.save(shard, path)

    _resave(source / "m-False-22", tmp_path / "m", into_one_buffer)
    from tests.unit.checkpoint.test_convert import assert_same_hf

    assert all(isinstance(t, stored.StoredTensor) for _, t in mcore.McoreCheckpointReader(tmp_path / "m").stored_tensors())
    convert.mcore_to_hf(tmp_path / "m", tmp_path / "back")
    assert_same_hf(source / "hf-False", tmp_path / "back")


def test_legacy_files_are_merged_in_memory(source, tmp_path):
    """Files in torch's pre-1.6 format do not say where tensors lie: read and merged as before."""
    _resave(source / "m-True-22", tmp_path / "m",
            lambda shard, path: torch.save(shard, path, _use_new_zipfile_serialization=False))
    assert not any(isinstance(t, stored.StoredTensor)
                   for _, t in mcore.McoreCheckpointReader(tmp_path / "m").stored_tensors())
    from tests.unit.checkpoint.test_convert import assert_same_hf

    convert.mcore_to_hf(tmp_path / "m", tmp_path / "back")
    assert_same_hf(source / "hf-True", tmp_path / "back")


def test_strided_runs():
    # (2, 3, 4) view of a (2, 5, 4) buffer, rows 1..3: one range of 3 rows per leading index.
    view = torch.empty(2, 5, 4)[:, 1:4]
    assert stored.strided_runs(100, view.shape, view.stride(), 4) == [(100, 48), (180, 48)]
    # Dense: one range; every other column: one element per range.
    assert stored.strided_runs(0, (2, 3), (3, 1), 2) == [(0, 12)]
    assert stored.strided_runs(0, (2, 2), (4, 2), 2) == [(0, 2), (4, 2), (8, 2), (12, 2)]
    assert stored.strided_runs(0, (0, 3), (3, 1), 2) == []


def test_a_range_past_the_end_of_its_file_is_a_clear_error(tmp_path):
    (tmp_path / "short.bin").write_bytes(b"\0" * 64)
    tensor = stored.StoredTensor(shape=(64,), dtype=torch.bfloat16,
                                 parts=(stored.StoredPart(file=str(tmp_path / "short.bin"), shape=(64,),
                                                          runs=((0, 128),)),))
    with pytest.raises(LlamatronError, match=r"short.bin ends before byte 64 .*truncated or corrupt"):
        _write_read(tensor, tmp_path / "out", dtype=torch.bfloat16)
    with pytest.raises(LlamatronError, match="truncated or corrupt"):
        tensor.read()
