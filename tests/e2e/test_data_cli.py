"""`llamatron data show` against Megatron's recorded train order."""

from __future__ import annotations

import json

from llamatron.cli.main import main


def test_data_show_json_equals_megatron(shared_dir, tmp_path, capsys):
    gpt = shared_dir / "testdata" / "megatron_gpt"
    rc = main(["data", "show", "--data-path", str(gpt / "corpus_text_document"), "--seq-len", "128", "--seed", "1234",
               "--split", "99,1,0", "--which", "train", "--count", "1000", "--json", "--cache-dir", str(tmp_path)])
    assert rc == 0
    expected = json.loads((gpt / "gpt_train_samples.json").read_text())["train_samples_tokens_plus_last_label"]
    assert json.loads(capsys.readouterr().out) == expected


def test_data_show_decodes_and_blends(shared_dir, capsys):
    prefix = str(shared_dir / "testdata" / "megatron_gpt" / "corpus_text_document")
    rc = main(["data", "show", "--data-path", "0.5", prefix, "0.5", prefix, "--seq-len", "16", "--count", "2",
               "--cache-dir", ""])
    assert rc == 0
    assert capsys.readouterr().out.count("--- sample") == 2


def test_data_show_bad_blend_is_one_line(shared_dir, capsys):
    prefix = str(shared_dir / "testdata" / "megatron_gpt" / "corpus_text_document")
    assert main(["data", "show", "--data-path", "0.3", prefix, "0.7", "--seq-len", "16"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("llamatron: error: blend") and err.count("\n") == 1
