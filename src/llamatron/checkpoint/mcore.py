"""Megatron-Core legacy ("torch") checkpoints on disk: tracker, shard files, `args`, safe loading.

Layout (DESIGN.md section 3):
    latest_checkpointed_iteration.txt      "release" or the iteration number
    release/ | iter_0000100/
        mp_rank_{tp:02d}/model_optim_rng.pt            PP == 1
        mp_rank_{tp:02d}_{pp:03d}/model_optim_rng.pt   PP > 1

Loading never unpickles arbitrary objects: `torch.load(weights_only=True)` with argparse.Namespace
allow-listed. Files written by Megatron-LM itself may hold more: numpy arrays in `rng_state` are
allowed (rebuilt by numpy's own array constructor), and Megatron classes pickled inside `args`
(enums such as AttnBackend) are replaced by inert `OpaqueValue` placeholders that keep their
constructor arguments and run no foreign code. Anything else is refused with the names listed.
"""

from __future__ import annotations

import argparse
import contextlib
import pickle
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from llamatron.checkpoint import keymaps
from llamatron.checkpoint.keymaps import ShardPlan
from llamatron.checkpoint.stored import StoredTensor, file_offset, stored_part
from llamatron.errors import LlamatronError
from llamatron.model.config import LlamaConfig, RopeScaling, from_hf_config, to_hf_config

TRACKER = "latest_checkpointed_iteration.txt"
SHARD_FILE = "model_optim_rng.pt"
CHECKPOINT_VERSION = 3.0
_ITER_DIR = re.compile(r"^(release|iter_\d{7})$")
_NUMPY_SAFE = {"numpy.ndarray", "numpy.dtype", "numpy.core.multiarray._reconstruct",
               "numpy._core.multiarray._reconstruct", "numpy.core.multiarray.scalar",
               "numpy._core.multiarray.scalar"}
_OPAQUE_MODULES = ("megatron.", "megatron_patch.")


# ---- paths -------------------------------------------------------------------------------------


def iteration_dir_name(iteration: int | str) -> str:
    return "release" if iteration == "release" else f"iter_{int(iteration):07d}"


def shard_path(ckpt_dir: Path, *, tp_rank: int, pp_rank: int, pp: int) -> Path:
    name = f"mp_rank_{tp_rank:02d}" if pp == 1 else f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"
    return ckpt_dir / name / SHARD_FILE


def is_mcore_checkpoint(path: Path | str) -> bool:
    """A checkpoint root (with the tracker file) or one release/iter_* directory of shards."""
    path = Path(path)
    if (path / TRACKER).is_file():
        return True
    return path.is_dir() and any((p / SHARD_FILE).is_file() for p in path.glob("mp_rank_*"))


def resolve_iteration_dir(path: Path | str, *, iteration: int | str | None = None) -> tuple[Path, int | str]:
    """(directory holding the mp_rank_* shards, its iteration). The tracker picks unless `iteration`
    (a number or "release") says otherwise; a path that is itself release/ or iter_* is used as is."""
    path = Path(path)
    if not path.exists():
        raise LlamatronError(f"Megatron-Core checkpoint {path} does not exist")
    if _ITER_DIR.match(path.name) and iteration is None:
        return path, "release" if path.name == "release" else int(path.name[5:])
    if iteration is None:
        tracker = path / TRACKER
        if not tracker.is_file():
            raise LlamatronError(
                f"{path}: missing tracker file {TRACKER}; point at a Megatron-Core checkpoint directory, "
                "or pass --iteration N (or release) to pick one"
            )
        text = tracker.read_text().strip()
        if text != "release" and not text.isdigit():
            raise LlamatronError(f"{tracker}: expected 'release' or an iteration number, found {text[:40]!r}")
        iteration = text if text == "release" else int(text)
    elif iteration != "release":
        iteration = int(iteration)
    ckpt_dir = path / iteration_dir_name(iteration)
    if not ckpt_dir.is_dir():
        found = sorted(p.name for p in path.iterdir() if _ITER_DIR.match(p.name))
        raise LlamatronError(
            f"{path}: iteration directory {ckpt_dir.name} not found (present: {', '.join(found) or 'none'})"
        )
    return ckpt_dir, iteration


def write_tracker(root: Path, iteration: int | str) -> None:
    (root / TRACKER).write_text(str(iteration))


# ---- safe loading ------------------------------------------------------------------------------


class OpaqueValue:
    """Stands in for a Megatron object pickled in a checkpoint (an enum in `args`, typically).
    Holds what the pickle passed to its constructor; never calls foreign code."""

    qualname = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> OpaqueValue:
        obj = super().__new__(cls)
        obj.args = args
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"<{self.qualname}{self.args!r}>"


def _resolve_numpy(name: str) -> Any:
    import numpy

    module, _, attr = name.rpartition(".")
    if module.startswith("numpy.core"):
        # numpy >= 2 pickles numpy._core; files from numpy 1.x name numpy.core (a deprecated alias).
        module = module.replace("numpy.core", "numpy._core", 1)
    obj = numpy
    for part in module.split(".")[1:] + [attr]:
        obj = getattr(obj, part)
    return obj


def _extra_safe_globals(path: Path) -> list[Any]:
    """Allow-list entries for what a Megatron-written file needs beyond weights_only's defaults."""
    names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    allowed: list[Any] = []
    refused = []
    for name in names:
        if name == "argparse.Namespace":
            allowed.append(argparse.Namespace)
        elif name in _NUMPY_SAFE or name.startswith("numpy.dtypes."):
            allowed.append((_resolve_numpy(name), name))
        elif name.startswith(_OPAQUE_MODULES):
            stub = type(name.rpartition(".")[2], (OpaqueValue,), {"qualname": name})
            allowed.append((stub, name))
        else:
            refused.append(name)
    if "numpy.dtype" in names:
        # A pickled dtype is rebuilt as an instance of its numpy.dtypes class (e.g. UInt32DType),
        # which the unpickler checks too although the file does not name it.
        import numpy

        allowed += [getattr(numpy.dtypes, n) for n in dir(numpy.dtypes) if n.endswith("DType")]
    if refused:
        raise LlamatronError(
            f"{path}: refusing to unpickle {', '.join(sorted(refused))} (only tensors, argparse.Namespace, "
            "numpy arrays and Megatron enums are loaded); re-save the checkpoint without them"
        )
    return allowed


def _torch_load(path: Path, allowed: list[Any], *, meta: bool = False) -> Any:
    with torch.serialization.safe_globals(allowed):
        if meta:
            return torch.load(path, map_location="meta", weights_only=True)
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:
            if "mmap" not in str(err):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)  # legacy non-zip file


def load_shard_file(path: Path, *, meta: bool = False) -> dict[str, Any]:
    """One shard file, memory-mapped (tensors are read from disk only when touched), weights_only.
    meta=True: tensors on the meta device, nothing mapped; their storages record where their
    bytes lie in the file (see checkpoint/stored.py)."""
    if not path.is_file():
        raise LlamatronError(f"missing shard {path}; the checkpoint is incomplete or its TP/PP differs from its args")
    try:
        try:
            state = _torch_load(path, [argparse.Namespace], meta=meta)
        except pickle.UnpicklingError:
            # Written by Megatron-LM (numpy RNG state, enums in args): scan the pickle for what it
            # names (slow, pure Python) only now, and allow the harmless part.
            state = _torch_load(path, _extra_safe_globals(path), meta=meta)
    except LlamatronError:
        raise
    except Exception as err:  # a truncated zip, a corrupt pickle: all mean the file is unusable
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise LlamatronError(f"cannot read shard {path} (truncated or corrupt?): {first[:200]}") from None
    if not isinstance(state, dict) or "model" not in state:
        raise LlamatronError(f"{path}: not a Megatron-Core checkpoint shard (no 'model' entry)")
    return state


# ---- args <-> config ---------------------------------------------------------------------------


def make_args(plan: ShardPlan, *, dtype: torch.dtype, pad_vocab_multiple: int = 1) -> argparse.Namespace:
    """The `args` Megatron checks at load (num_layers, hidden_size, num_attention_heads, TP, PP,
    padded_vocab_size, ...) plus the model shape. `vocab_size` is the true vocabulary (reading drops
    the padding rows exactly); `llamatron_*` fields let llamatron restore the HF config exactly."""
    c = plan.config
    scaling = c.rope_scaling
    return argparse.Namespace(
        num_layers=c.num_layers, hidden_size=c.hidden_size, ffn_hidden_size=c.ffn_hidden_size,
        num_attention_heads=c.num_heads, group_query_attention=c.num_kv_heads != c.num_heads,
        num_query_groups=c.num_kv_heads, kv_channels=c.dim_per_head,
        max_position_embeddings=c.max_position_embeddings, position_embedding_type="rope",
        add_position_embedding=False, rotary_base=c.rope_theta, rotary_percent=1.0, rotary_interleaved=False,
        use_rope_scaling=scaling is not None, rope_scaling_factor=scaling.factor if scaling else 1.0,
        normalization="RMSNorm", norm_epsilon=c.norm_eps, swiglu=True, add_bias_linear=False,
        add_qkv_bias=False, untie_embeddings_and_output_weights=not c.tie_word_embeddings,
        vocab_size=c.vocab_size, padded_vocab_size=plan.padded_vocab, make_vocab_size_divisible_by=pad_vocab_multiple,
        tensor_model_parallel_size=plan.tp, pipeline_model_parallel_size=plan.pp,
        params_dtype=dtype, bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
        init_method_std=c.init_std, attention_dropout=0.0, hidden_dropout=0.0,
        transformer_impl="transformer_engine" if plan.te else "local", use_mcore_models=True,
        consumed_train_samples=0, consumed_valid_samples=0,
        llamatron_layout=plan.layout, llamatron_stage_layers=list(plan.stage_layers),
        llamatron_hf_config=to_hf_config(c, torch_dtype=str(dtype).removeprefix("torch.")),
    )


def config_from_args(args: argparse.Namespace, *, source: str) -> LlamaConfig:
    """The model config recorded in `args`: exact from llamatron's own record, else from Megatron's fields."""
    recorded = getattr(args, "llamatron_hf_config", None)
    if isinstance(recorded, dict):
        return from_hf_config(recorded, source=source)
    problems = []
    if getattr(args, "normalization", "RMSNorm") != "RMSNorm":
        problems.append(f"normalization {args.normalization!r}")
    if not getattr(args, "swiglu", True):
        problems.append("swiglu off")
    if getattr(args, "add_bias_linear", False) or getattr(args, "add_qkv_bias", False):
        problems.append("linear biases")
    if getattr(args, "num_experts", None):
        problems.append(f"{args.num_experts} experts (MoE)")
    if getattr(args, "position_embedding_type", "rope") != "rope":
        problems.append(f"position embedding {args.position_embedding_type!r}")
    if problems:
        raise LlamatronError(f"{source}: not a Llama model ({'; '.join(problems)}); llamatron converts LLaMA 3.x only")
    try:
        heads = int(args.num_attention_heads)
        groups = int(args.num_query_groups) if getattr(args, "group_query_attention", False) else heads
        hidden = int(args.hidden_size)
        kv_channels = getattr(args, "kv_channels", None)
        vocab = getattr(args, "vocab_size", None) or args.padded_vocab_size
        scaling = None
        if getattr(args, "use_rope_scaling", False):
            scaling = RopeScaling(factor=float(getattr(args, "rope_scaling_factor", 8.0)))
        return LlamaConfig(
            vocab_size=int(vocab), hidden_size=hidden, num_layers=int(args.num_layers), num_heads=heads,
            num_kv_heads=groups,
            head_dim=None if kv_channels in (None, hidden // heads) else int(kv_channels),
            ffn_hidden_size=int(args.ffn_hidden_size), norm_eps=float(getattr(args, "norm_epsilon", 1e-5)),
            rope_theta=float(getattr(args, "rotary_base", 10000)), rope_scaling=scaling,
            max_position_embeddings=int(args.max_position_embeddings),
            tie_word_embeddings=not getattr(args, "untie_embeddings_and_output_weights", False),
            init_std=float(getattr(args, "init_method_std", 0.02)),
        )
    except AttributeError as missing:
        raise LlamatronError(f"{source}: args lacks a model shape field ({missing})") from None


# ---- reading a whole checkpoint ----------------------------------------------------------------


class McoreCheckpointReader:
    """A Megatron-Core checkpoint of any TP x PP, read one layer at a time.

    Shard files are memory-mapped and reopened per layer, so resident memory stays near one layer
    however large the model. `read` makes it a source for keymaps.build_shard (resharding)."""

    def __init__(self, path: Path | str, *, iteration: int | str | None = None) -> None:
        self.root = Path(path)
        self.dir, self.iteration = resolve_iteration_dir(self.root, iteration=iteration)
        first = load_shard_file(self._first_shard_path())
        args = first.get("args")
        if not isinstance(args, argparse.Namespace):
            raise LlamatronError(f"{self.dir}: shard has no `args` Namespace; cannot tell the model's shape")
        self.args = args
        self.checkpoint_version = first.get("checkpoint_version")
        self.config = config_from_args(args, source=str(self.dir))
        tp, pp = int(args.tensor_model_parallel_size), int(args.pipeline_model_parallel_size)
        last = first if pp == 1 else load_shard_file(shard_path(self.dir, tp_rank=0, pp_rank=pp - 1, pp=pp))
        layout = getattr(args, "llamatron_layout", None) or keymaps.detect_layout(last["model"].keys())
        if layout is None:
            raise LlamatronError(f"{self.dir}: cannot tell the layout from the last stage's keys")
        stage_layers = getattr(args, "llamatron_stage_layers", None) or self._count_stage_layers(pp)
        self.plan = ShardPlan(
            config=self.config, tp=tp, pp=pp, layout=layout, stage_layers=tuple(stage_layers),
            padded_vocab=int(getattr(args, "padded_vocab_size", None) or self.config.vocab_size),
        )
        self.dtype = next(t.dtype for t in first["model"].values() if isinstance(t, torch.Tensor))
        del first, last
        self._checked: set[int] = set()
        self._cached: tuple[int, dict[str, torch.Tensor]] | None = None

    def _first_shard_path(self) -> Path:
        candidates = sorted(self.dir.glob(f"mp_rank_00*/{SHARD_FILE}"))
        if not candidates:
            raise LlamatronError(f"{self.dir}: no mp_rank_*/{SHARD_FILE} shard files found")
        return candidates[0]

    def _count_stage_layers(self, pp: int) -> list[int]:
        counts = []
        for pp_rank in range(pp):
            keys = load_shard_file(shard_path(self.dir, tp_rank=0, pp_rank=pp_rank, pp=pp))["model"].keys()
            counts.append(len({k.split(".")[2] for k in keys if k.startswith("decoder.layers.")}))
        return counts

    @contextlib.contextmanager
    def stage(self, pp_rank: int) -> Iterator[list[dict[str, torch.Tensor]]]:
        """The `model` state dicts of one stage's TP shards (memory-mapped), checked once per stage."""
        plan = self.plan
        states = []
        for tp_rank in range(plan.tp):
            path = shard_path(self.dir, tp_rank=tp_rank, pp_rank=pp_rank, pp=plan.pp)
            states.append(load_shard_file(path)["model"])
            if pp_rank not in self._checked:
                keymaps.check_stage_keys(states[-1].keys(), plan, pp_rank=pp_rank, source=str(path))
        self._checked.add(pp_rank)
        try:
            yield states
        finally:
            states.clear()  # drops the mappings

    def layer(self, layer: int) -> dict[str, torch.Tensor]:
        """Decoder layer `layer` (global index) as internal tensors, merged across TP."""
        pp_rank, _ = self.plan.stage_of(layer)
        with self.stage(pp_rank) as states:
            # Norms are views into the mapped file; the mapping lives as long as they do (one layer).
            return keymaps.merge_layer(states, self.plan, layer=layer)

    def extra(self, name: str) -> torch.Tensor:
        """embed_tokens.weight, norm.weight or lm_head.weight (untied), merged across TP."""
        with self.stage(keymaps.extra_stage(self.plan, name)) as states:
            return keymaps.merge_extra(states, self.plan, name=name)

    def stored_tensors(self) -> Iterator[tuple[str, StoredTensor | torch.Tensor]]:
        """Every internal tensor in HF order, as in `tensors()`, but as byte ranges of the shard files
        (nothing is read; see checkpoint/stored.py). Each stage's shards are loaded once, on the meta
        device. A stage whose files do not tell where tensors lie (legacy non-zip) is merged in memory."""
        names = keymaps.extra_names(self.plan)
        yield names[0], self._stored_extra(names[0])
        for pp_rank in range(self.plan.pp):
            stage = self._meta_stage(pp_rank)
            for layer in self.plan.stage_range(pp_rank):
                if stage is None:
                    yield from self.layer(layer).items()
                    continue
                for name, pieces in keymaps.layer_pieces(stage[0], self.plan, layer=layer).items():
                    yield name, self._stored(pieces, stage[1]) or self.layer(layer)[name]
        for name in names[1:]:
            yield name, self._stored_extra(name)

    def _meta_stage(self, pp_rank: int) -> tuple[list[dict[str, torch.Tensor]], list[str]] | None:
        """One stage's TP shards on the meta device, and their paths; None if torch cannot place them."""
        plan = self.plan
        paths = [shard_path(self.dir, tp_rank=r, pp_rank=pp_rank, pp=plan.pp) for r in range(plan.tp)]
        states = [load_shard_file(path, meta=True)["model"] for path in paths]
        if pp_rank not in self._checked:
            for state, path in zip(states, paths, strict=True):
                keymaps.check_stage_keys(state.keys(), plan, pp_rank=pp_rank, source=str(path))
            self._checked.add(pp_rank)
        some = next(t for t in states[0].values() if isinstance(t, torch.Tensor))
        if not some.is_meta or file_offset(some) is None:
            return None
        return states, [str(path) for path in paths]

    def _stored(self, pieces: keymaps.Pieces, paths: list[str]) -> StoredTensor | None:
        # Parts come from TP ranks in order; a single part (a norm) is rank 0's.
        parts = [stored_part(view, path) for view, path in zip(pieces.parts, paths, strict=False)]
        if any(part is None for part in parts) or len({view.dtype for view in pieces.parts}) != 1:
            return None
        return StoredTensor(shape=pieces.shape, dtype=pieces.parts[0].dtype, parts=tuple(parts), dim=pieces.dim)

    def _stored_extra(self, name: str) -> StoredTensor | torch.Tensor:
        stage = self._meta_stage(keymaps.extra_stage(self.plan, name))
        stored = None
        if stage is not None:
            stored = self._stored(keymaps.extra_pieces(stage[0], self.plan, name=name), stage[1])
        return stored or self.extra(name)

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Every internal tensor, in HF order (embedding, layers, norm, output layer), one at a time."""
        names = keymaps.extra_names(self.plan)
        yield names[0], self.extra(names[0])
        for layer in range(self.config.num_layers):
            yield from self.layer(layer).items()
        for name in names[1:]:
            yield name, self.extra(name)

    def read(self, name: str, *, rows: slice | None = None, cols: slice | None = None) -> torch.Tensor:
        """keymaps.Read over this checkpoint (the last merged layer is cached: shards read a layer's
        tensors one after another)."""
        parts = name.split(".")
        if parts[0] == "layers":
            layer = int(parts[1])
            if self._cached is None or self._cached[0] != layer:
                self._cached = (layer, self.layer(layer))
            tensor = self._cached[1][name]
        else:
            tensor = self.extra(name)
        if rows is not None:
            tensor = tensor[rows]
        if cols is not None:
            tensor = tensor[:, cols]
        return tensor


def save_shard(
    ckpt_dir: Path, model_state: dict[str, torch.Tensor | None], *, args: argparse.Namespace, plan: ShardPlan,
    tp_rank: int, pp_rank: int, iteration: int | str,
) -> Path:
    """Write one model_optim_rng.pt (a converted checkpoint: no optimizer or RNG entries)."""
    path = shard_path(ckpt_dir, tp_rank=tp_rank, pp_rank=pp_rank, pp=plan.pp)
    path.parent.mkdir(parents=True, exist_ok=True)
    entries = {"args": args, "checkpoint_version": CHECKPOINT_VERSION,
               "iteration": 0 if iteration == "release" else int(iteration), "model": model_state}
    # The zip records' CRC32 costs more than the write itself on slow CPUs, and no torch.load checks it
    # (PyTorch builds miniz with MINIZ_DISABLE_ZIP_READER_CRC32_CHECKS), so it is left out.
    from torch.utils.serialization import config as serialization_config

    with serialization_config.patch({"save.compute_crc32": False}):
        torch.save(entries, path)
    return path


def load_mcore_model(
    path: Path | str, *, device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
    iteration: int | str | None = None,
):
    """llamatron's single-device Llama from a Megatron-Core checkpoint of any TP x PP."""
    from llamatron.model import build_model

    reader = McoreCheckpointReader(path, iteration=iteration)
    model = build_model(reader.config, device=device, dtype=dtype or reader.dtype, seed=None)
    params = dict(model.named_parameters())  # tied lm_head is the embedding: listed once
    filled = set()
    with torch.no_grad():
        for name, tensor in reader.tensors():
            params[name].copy_(tensor)
            filled.add(name)
    assert filled == set(params), sorted(set(params) ^ filled)
    return model
