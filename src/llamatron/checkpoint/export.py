"""A llamatron training checkpoint out as a HF directory or a Megatron-Core checkpoint (any TP x PP)."""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path

import torch

from llamatron.checkpoint import keymaps
from llamatron.checkpoint.convert import write_mcore_shards
from llamatron.checkpoint.dcp import load_dcp_model
from llamatron.checkpoint.hf import TOKENIZER_FILES, save_hf_model


def export_to_hf(run: Path, out: Path, *, dtype: torch.dtype = torch.bfloat16, force: bool = False) -> Path:
    model, tokenizer = load_dcp_model(run)
    return save_hf_model(model, out, dtype=dtype, tokenizer=tokenizer, force=force)


def export_to_mcore(
    run: Path, out: Path, *, tp: int, pp: int, layout: str = "pai", pp_layers: list[int] | None = None,
    pad_vocab_multiple: int = 1, dtype: torch.dtype = torch.bfloat16, force: bool = False,
) -> Path:
    """Megatron-Core `release` shards (the seed's layout by default), tokenizer files beside them."""
    model, tokenizer = load_dcp_model(run)
    state = model.state_dict()
    plan = keymaps.make_plan(model.config, tp=tp, pp=pp, layout=layout, pp_layers=pp_layers,
                             pad_vocab_multiple=pad_vocab_multiple)
    with tempfile.TemporaryDirectory() as tmp:
        copy_files = _tokenizer_files(tokenizer, Path(tmp))
        return write_mcore_shards(
            lambda: contextlib.nullcontext(keymaps.state_dict_reader(state)), plan, out, dtype=dtype,
            pad_vocab_multiple=pad_vocab_multiple, force=force, copy_files=copy_files,
            source_bytes=model.config.num_params() * dtype.itemsize,
        )


def _tokenizer_files(spec: str, scratch: Path) -> list[Path]:
    source = Path(spec)
    if not source.is_dir():
        from llamatron.tokenizer.export import export_hf_tokenizer

        export_hf_tokenizer(scratch)
        source = scratch
    return [source / name for name in TOKENIZER_FILES if (source / name).is_file()]
