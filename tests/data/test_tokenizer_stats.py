"""hcx tokenizer stats: hand-computed fertility, published token ids per format, CLI."""

import json

import pytest

from hcx.data import tokenizer_stats as ts
from hcx.tokenizer.loading import open_tokenizer
from tests.conftest import hcx


@pytest.fixture(scope="module")
def refs(shared_data):
    root = shared_data / "tokenizers"
    if not root.is_dir():
        pytest.skip("no reference tokenizers in the data root")
    return root


def test_bytes_fertility_hand_computed():
    tok = open_tokenizer("bytes")
    r = ts.measure(tok, "ko", ["안녕 hi"])
    # 2 Hangul syllables x 3 bytes + space + 2 = 9 tokens; 2 words; 4 non-space chars
    assert (r.tokens, r.words, r.chars, r.bytes) == (9, 2, 4, 9)
    assert (r.tokens_per_word, r.tokens_per_char, r.bytes_per_token) == (4.5, 2.25, 1.0)


@pytest.mark.parametrize("path, text, ids, kind", [
    ("gpt2", "Hello world", [15496, 995], "byte-level BPE"),
    ("cl100k_base/cl100k_base.tiktoken", "hello world", [15339, 1917], "cl100k_base split"),
    ("o200k_base/o200k_base.tiktoken", "hello world", [24912, 2375], "o200k_base split"),
    ("llama-2/tokenizer.model", "Hello world", [15043, 3186], "SentencePiece"),
    ("llama-3/tokenizer.model", "hello world", [15339, 1917], "cl100k_base split"),
])
def test_formats_give_published_ids(refs, path, text, ids, kind):
    tok = open_tokenizer(str(refs / path))
    assert tok.encode(text) == ids
    assert kind in tok.kind


def test_directories_and_compressed_json_load(refs):
    for path, name, vocab in [("polyglot-ko", "polyglot-ko", 30003), ("gemma-3", "gemma-3", 262145),
                              ("exaone-3.5", "exaone-3.5", 102400)]:
        tok = open_tokenizer(str(refs / path))
        assert (tok.name, tok.vocab_size) == (name, vocab)
        assert len(tok.encode("한국어 토크나이저")) > 0


def test_cli_table_and_json(refs, tmp_path):
    text = tmp_path / "t.jsonl"
    text.write_text(json.dumps({"ko": "안녕 hi"}, ensure_ascii=False) + "\n")
    out = tmp_path / "stats.json"
    proc = hcx("tokenizer", "stats", "bytes", f"gpt2={refs / 'gpt2'}",
               "--text", f"ko={text}#ko", "--json", str(out))
    assert "| bytes | 4.500 | 2.250 | 1.00 |" in proc.stdout
    rows = json.loads(out.read_text())
    assert [r["tokenizer"] for r in rows] == ["bytes", "gpt2"]
    assert rows[0]["tokens"] == 9


def test_cli_errors_name_the_input(tmp_path):
    proc = hcx("tokenizer", "stats", "bytes", "--text", f"ko={tmp_path}/x.jsonl", check=False)
    assert proc.returncode == 1 and "x.jsonl: file not found" in proc.stderr
    text = tmp_path / "t.txt"
    text.write_text("hello\n")
    proc = hcx("tokenizer", "stats", str(tmp_path / "missing.model"), "--text", f"en={text}",
               check=False)
    assert proc.returncode == 1 and "missing.model does not exist" in proc.stderr
    (tmp_path / "empty").mkdir()
    proc = hcx("tokenizer", "stats", str(tmp_path / "empty"), "--text", f"en={text}", check=False)
    assert proc.returncode == 1 and "no tokenizer.json" in proc.stderr
    proc = hcx("tokenizer", "stats", "bytes", "--text", str(text), check=False)
    assert proc.returncode == 1 and "expected LABEL=PATH" in proc.stderr


@pytest.mark.parametrize("name", ["bytes", "qwen3", "llama-2/tokenizer.model",
                                  "cl100k_base/cl100k_base.tiktoken", "exaone-3.5"])
def test_tokenize_round_trip(refs, tmp_path, name):
    spec = name if name == "bytes" else str(refs / name)
    lines = ["안녕하세요, 한국어 문장입니다.", "def f(x):  return x ** 2  # code", "emoji 🙂 mixed 한글 text"]
    src = tmp_path / "in.txt"
    src.write_text("\n".join(lines) + "\n", encoding="utf-8")
    ids = hcx("tokenize", spec, "--input", str(src)).stdout
    assert len(ids.splitlines()) == 3
    (tmp_path / "ids.txt").write_text(ids)
    back = hcx("tokenize", spec, "--decode", "--input", str(tmp_path / "ids.txt")).stdout
    assert back.splitlines() == lines
    tok = open_tokenizer(spec)
    counts = hcx("tokenize", spec, "--count", "--input", str(src)).stdout.split()
    assert [int(c) for c in counts] == [len(tok.encode(x)) for x in lines]


def test_tokenize_decode_rejects_non_ids(tmp_path):
    bad = tmp_path / "ids.txt"
    bad.write_text("1 2\n12 abc\n")
    proc = hcx("tokenize", "bytes", "--decode", "--input", str(bad), check=False)
    assert proc.returncode == 1 and f"{bad}:2: expected token ids" in proc.stderr
