"""HF directories: bit-exact round trips, interchange with transformers, and clear errors on bad input."""

from __future__ import annotations

import json
import shutil
import struct

import pytest
import torch

from llamatron.checkpoint.hf import (
    INDEX_FILE,
    SINGLE_FILE,
    HFCheckpointReader,
    HFCheckpointWriter,
    generation_config,
    hf_name,
    internal_name,
    load_hf_model,
    save_hf_model,
)
from llamatron.errors import LlamatronError
from llamatron.model import build_model, preset
from tests.conftest import tiny_config

transformers = pytest.importorskip("transformers")

REL_TOL = 1e-5  # fp32 logits against transformers, relative to the largest logit


def _rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours - ref).abs().max() / ref.abs().max()).item()


def _tokens(vocab: int, seq: int = 80) -> torch.Tensor:
    return torch.randint(0, vocab, (2, seq), generator=torch.Generator().manual_seed(0))


def _saved(tmp_path, *, name="ckpt", **changes):
    model = build_model(tiny_config(**changes), seed=3)
    out = save_hf_model(model, tmp_path / name, dtype=torch.float32)
    return model, out


def test_name_mapping():
    assert hf_name("layers.3.mlp.up_proj.weight") == "model.layers.3.mlp.up_proj.weight"
    assert hf_name("embed_tokens.weight") == "model.embed_tokens.weight"
    assert hf_name("lm_head.weight") == "lm_head.weight"
    for name in ("model.norm.weight", "lm_head.weight", "model.layers.0.input_layernorm.weight"):
        assert hf_name(internal_name(name)) == name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_round_trip_is_bit_identical(tmp_path, dtype, tied):
    config = tiny_config(tie_word_embeddings=tied)
    model = build_model(config, seed=1)
    out = save_hf_model(model, tmp_path / "out", dtype=dtype, max_shard_bytes=30_000)
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((out / INDEX_FILE).read_text())
    expected = {hf_name(k): v.to(dtype) for k, v in model.state_dict().items()}
    if tied:
        del expected["lm_head.weight"]
    assert set(index["weight_map"]) == set(expected)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in expected.values())
    by_shard: dict[str, list[int]] = {}
    for name, file in index["weight_map"].items():
        by_shard.setdefault(file, []).append(expected[name].numel() * expected[name].element_size())
    # A shard stays under the limit unless one tensor alone exceeds it (as transformers shards).
    assert all(sum(sizes) <= 30_000 or len(sizes) == 1 for sizes in by_shard.values())

    with HFCheckpointReader(out) as reader:
        assert reader.config == config
        assert reader.dtype == dtype
        assert set(reader.names()) == set(expected)
        for name, tensor in reader:
            assert tensor.dtype == dtype and torch.equal(tensor, expected[name]), name
        full = expected["model.layers.1.mlp.up_proj.weight"]
        part = reader.get_slice("model.layers.1.mlp.up_proj.weight")
        assert tuple(part.get_shape()) == tuple(full.shape)
        assert torch.equal(part[5:9], full[5:9]) and torch.equal(part[:, 3:7], full[:, 3:7])

    loaded = load_hf_model(out)
    for name, tensor in loaded.state_dict().items():
        assert tensor.dtype == dtype and torch.equal(tensor, model.state_dict()[name].to(dtype)), name
    assert (loaded.lm_head.weight is loaded.embed_tokens.weight) == tied


def test_single_shard_and_directory_without_index(tmp_path):
    model, out = _saved(tmp_path)
    assert (out / SINGLE_FILE).is_file() and not (out / INDEX_FILE).exists()
    sharded = save_hf_model(model, tmp_path / "sharded", max_shard_bytes=50_000)
    (sharded / INDEX_FILE).unlink()
    reloaded = load_hf_model(sharded)
    for name, tensor in reloaded.state_dict().items():
        assert torch.equal(tensor, model.state_dict()[name]), name


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_transformers_loads_our_directory(tmp_path, tied):
    model, out = _saved(tmp_path, tie_word_embeddings=tied)
    hf_config = transformers.AutoConfig.from_pretrained(out)
    assert hf_config.rope_parameters["rope_type"] == "llama3"
    assert hf_config.rope_parameters["original_max_position_embeddings"] == 64
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tokens = _tokens(model.config.vocab_size, seq=300)  # past the original 64 positions of the scaling
    with torch.no_grad():
        assert _rel_err(model.eval()(tokens), hf(tokens).logits) <= REL_TOL


def _tiny_hf_tokenizer(path):
    """A small BPE tokenizer with a chat template, saved the way transformers saves any tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"], show_progress=False)
    backend.train_from_iterator(["hello world", "llamatron converts checkpoints", "你好"] * 10, trainer)
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>")
    tok.chat_template = "{% for m in messages %}<s>{{ m['content'] }}</s>{% endfor %}"
    tok.save_pretrained(path)
    return path


def test_tokenizer_copied_from_hf_dir_loads_in_transformers(tmp_path):
    source = _tiny_hf_tokenizer(tmp_path / "tok")
    model = build_model(tiny_config(), seed=2)
    out = save_hf_model(model, tmp_path / "out", tokenizer=source)
    ours, reference = transformers.AutoTokenizer.from_pretrained(out), transformers.AutoTokenizer.from_pretrained(source)
    text = "hello llamatron, 你好 </s>"
    assert ours(text)["input_ids"] == reference(text)["input_ids"]
    assert ours.chat_template == reference.chat_template
    assert ours.eos_token == "</s>"


def test_llama3_tokenizer_export(tmp_path):
    pytest.importorskip("llamatron.tokenizer.export")
    from llamatron.tokenizer import load_tokenizer

    out = save_hf_model(build_model(tiny_config(), seed=2), tmp_path / "out", tokenizer="llama3")
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    text = "Megatron and llamatron: 中文 text."
    assert hf_tok(text, add_special_tokens=False)["input_ids"] == load_tokenizer("llama3").encode(text)


def test_generation_config_lists_llama3_stop_tokens(tmp_path):
    assert generation_config(preset("llama3.1-8b"))["eos_token_id"] == [128001, 128008, 128009]
    config = tiny_config(vocab_size=128256, hidden_size=32, num_heads=2, num_kv_heads=1, num_layers=1,
                         bos_token_id=128000, eos_token_id=128001, tie_word_embeddings=True)
    out = save_hf_model(build_model(config, seed=1), tmp_path / "out")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert hf.generation_config.bos_token_id == 128000
    assert hf.generation_config.eos_token_id == [128001, 128008, 128009]
    assert generation_config(tiny_config())["eos_token_id"] == 2  # other vocabularies keep config.json's eos


@pytest.mark.parametrize("shard_size", [None, "40KB"], ids=["single", "sharded"])
def test_reads_transformers_save_pretrained(tmp_path, shard_size):
    from llamatron.model import to_hf_config

    config = tiny_config()
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**to_hf_config(config, torch_dtype="float32")))
    kwargs = {"max_shard_size": shard_size} if shard_size else {}
    hf.save_pretrained(tmp_path / "hf", **kwargs)
    assert (tmp_path / "hf" / INDEX_FILE).exists() == bool(shard_size)
    ours = load_hf_model(tmp_path / "hf")
    assert ours.config == config
    tokens = _tokens(config.vocab_size)
    with torch.no_grad():
        assert _rel_err(ours.eval()(tokens), hf.eval()(tokens).logits) <= REL_TOL


def test_smollm2_matches_transformers():
    """A real checkpoint (30 layers, GQA 9/3, head_dim 64, tied, rope 1e5 without scaling)."""
    from llamatron.checkpoint.bundled import smollm2_hf_dir

    hf_dir = smollm2_hf_dir()
    ours = load_hf_model(hf_dir).eval()
    assert ours.config.num_layers == 30 and ours.config.tie_word_embeddings
    hf = transformers.LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    tokens = _tokens(ours.config.vocab_size, seq=48)
    with torch.no_grad():
        assert _rel_err(ours(tokens), hf(tokens).logits) <= REL_TOL


# ---- errors --------------------------------------------------------------------------------------


def test_missing_directory_and_config(tmp_path):
    with pytest.raises(LlamatronError, match="does not exist"):
        HFCheckpointReader(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(LlamatronError, match="no config.json"):
        HFCheckpointReader(tmp_path / "empty")


def test_non_llama_config(tmp_path):
    _, out = _saved(tmp_path)
    hf_config = json.loads((out / "config.json").read_text())
    hf_config.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
    (out / "config.json").write_text(json.dumps(hf_config))
    with pytest.raises(LlamatronError, match="not a Llama model.*gpt2"):
        HFCheckpointReader(out)


def test_corrupt_safetensors_names_the_file(tmp_path):
    _, out = _saved(tmp_path)
    (out / SINGLE_FILE).write_bytes(struct.pack("<Q", 40) + b"{not json at all" + b"\0" * 100)
    with pytest.raises(LlamatronError, match=r"model\.safetensors is not a valid safetensors file"):
        HFCheckpointReader(out)
    (out / SINGLE_FILE).write_bytes(b"\x01\x02")
    with pytest.raises(LlamatronError, match=r"model\.safetensors.*bad header length"):
        HFCheckpointReader(out)


def test_truncated_safetensors_names_the_file(tmp_path):
    _, out = _saved(tmp_path)
    data = (out / SINGLE_FILE).read_bytes()
    (out / SINGLE_FILE).write_bytes(data[:-1000])
    with pytest.raises(LlamatronError, match=r"model\.safetensors.*truncated"):
        HFCheckpointReader(out)


def test_index_naming_missing_shard_or_tensor(tmp_path):
    model = build_model(tiny_config(), seed=1)
    out = save_hf_model(model, tmp_path / "out", max_shard_bytes=50_000)
    shards = sorted(out.glob("model-*.safetensors"))
    shards[-1].unlink()
    with pytest.raises(LlamatronError, match=f"do not exist: {shards[-1].name}"):
        HFCheckpointReader(out)

    out = save_hf_model(model, tmp_path / "out2", max_shard_bytes=50_000)
    index = json.loads((out / INDEX_FILE).read_text())
    index["weight_map"]["model.layers.9.mlp.up_proj.weight"] = shards[0].name
    (out / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(LlamatronError, match="lists tensors its shards do not hold: model.layers.9.mlp.up_proj"):
        HFCheckpointReader(out)


def test_missing_unexpected_and_misshaped_tensors(tmp_path):
    from safetensors.torch import load_file, save_file

    _, out = _saved(tmp_path)
    tensors = load_file(out / SINGLE_FILE)
    del tensors["model.layers.1.self_attn.k_proj.weight"]
    tensors["model.layers.0.mlp.extra.weight"] = torch.zeros(2)
    tensors["model.norm.weight"] = torch.ones(63)
    save_file(tensors, out / SINGLE_FILE, metadata={"format": "pt"})
    with pytest.raises(LlamatronError) as err:
        load_hf_model(out)
    message = str(err.value)
    assert "missing tensors: model.layers.1.self_attn.k_proj.weight" in message
    assert "unexpected tensors: model.layers.0.mlp.extra.weight" in message
    assert "model.norm.weight has shape (63,), config.json implies (64,)" in message


def test_failed_write_leaves_nothing_behind(tmp_path):
    config = tiny_config()
    model = build_model(config, seed=1)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="boom"), HFCheckpointWriter(out, config=config, dtype=torch.bfloat16) as w:
        w.write("model.embed_tokens.weight", model.embed_tokens.weight)
        raise RuntimeError("boom")
    with pytest.raises(LlamatronError, match="incomplete.*never written"), \
            HFCheckpointWriter(out, config=config, dtype=torch.bfloat16) as w:
        w.write("model.embed_tokens.weight", model.embed_tokens.weight)
    with pytest.raises(LlamatronError, match="shape"), HFCheckpointWriter(out, config=config, dtype=torch.float32) as w:
        w.write("model.norm.weight", torch.ones(3))
    with pytest.raises(LlamatronError, match="unknown tensor name 'layers.0"), \
            HFCheckpointWriter(out, config=config, dtype=torch.float32) as w:
        w.write("layers.0.mlp.up_proj.weight", model.layers["0"].mlp.up_proj.weight)
    assert list(tmp_path.iterdir()) == []


def test_existing_output_needs_force(tmp_path):
    model, out = _saved(tmp_path)
    with pytest.raises(LlamatronError, match="not empty.*--force"):
        save_hf_model(model, out)
    other = build_model(tiny_config(), seed=9)
    save_hf_model(other, out, force=True)
    assert torch.equal(load_hf_model(out).embed_tokens.weight, other.embed_tokens.weight)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_bad_tokenizer_source_fails_before_writing(tmp_path):
    with pytest.raises(LlamatronError, match="neither 'llama3' nor a directory"):
        save_hf_model(build_model(tiny_config(), seed=1), tmp_path / "out", tokenizer=tmp_path / "missing")
    assert not (tmp_path / "out").exists()


def test_shard_vanishing_after_open_is_a_clear_error(tmp_path):
    """Shards are opened lazily; a file gone since the headers were checked fails with its path."""
    _, out = _saved(tmp_path)
    reader = HFCheckpointReader(out)
    shutil.move(out, tmp_path / "moved")
    with pytest.raises(LlamatronError, match="cannot read"):
        reader.get("model.norm.weight")
