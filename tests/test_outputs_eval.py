"""Promise 7: `surgeon eval --data FILE` evaluates the whole of FILE; a length beyond the
model's positions is exit 2 (as in profile), not silently clamped."""
from __future__ import annotations

import json

from typer.testing import CliRunner

from surgeon.cli import app

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def _file(tmp_path, minilm, n_docs):
    from surgeon.profiles.data import builtin_documents

    docs = builtin_documents()[:n_docs]
    (tmp_path / "t.txt").write_text("\n\n".join(docs))
    n = sum(len(minilm.tokenizer(d, add_special_tokens=False)["input_ids"]) for d in docs)
    eos = minilm.tokenizer.eos_token_id
    return tmp_path / "t.txt", n + ((n_docs - 1) if eos is not None else 0)


def test_eval_data_file_counts_every_token(tmp_path, minilm):
    f, n_tokens = _file(tmp_path, minilm, 3)
    for seq in ("512", "100"):
        r = run("eval", "minilm-l6", "--data", f, "--seq-len", seq, "--json")
        assert r.exit_code == 0, r.output
        res = json.loads(r.output)
        assert res["tokens"] == n_tokens and res["data"] == str(f)  # not half of it, not a sample of rows
        assert res["samples"] == -(-n_tokens // int(seq))


def test_eval_short_file_with_default_samples(tmp_path, minilm):
    (tmp_path / "s.txt").write_text("A short file of only a few words, fewer than four rows of tokens.")
    r = run("eval", "minilm-l6", "--data", tmp_path / "s.txt", "--json")
    assert r.exit_code == 0, r.output
    n = len(minilm.tokenizer((tmp_path / "s.txt").read_text(), add_special_tokens=False)["input_ids"])
    assert json.loads(r.output)["tokens"] == n


def test_eval_seq_len_beyond_positions_is_exit_2(tmp_path):
    (tmp_path / "t.txt").write_text("some text " * 50)
    for extra in ([], ["--data", tmp_path / "t.txt"]):
        r = run("eval", "minilm-l6", "--seq-len", "100000", *extra)
        assert r.exit_code == 2 and "beyond" in r.output and "512 positions" in r.output, r.output
