"""hcx tokenizer extend: new Korean pieces appended to a SentencePiece BPE model (Mistral's)
and to a byte-level tokenizer.json (Polyglot-Ko's; Qwen3's and Llama 3's in
bench/vocab_extension.py), every old id and every non-Korean encoding
unchanged, the SentencePiece twin encoding like the model; and the mean initialisation
of new rows by hand."""

import json
import sysconfig
from pathlib import Path

import pytest
import torch

from tests.conftest import data_root, hcx

ADD = 150
KO_CORPUS = "data://train/pretrain/ko_legalize_kr_precedents/train.jsonl"
BASES = {"mistral": "tokenizers/mistral/tokenizer.model.v1", "polyglot": "tokenizers/polyglot-ko"}


def held_out(field: str, n: int = 60) -> list[str]:
    lines = (data_root() / "eval/flores200_kor_eng/dev.jsonl").read_text().splitlines()[:n]
    return [json.loads(line)[field] for line in lines]


def code_sample() -> list[str]:
    text = Path(sysconfig.get_paths()["stdlib"], "json", "decoder.py").read_text()
    return [text[i:i + 2000] for i in range(0, len(text), 2000)]


@pytest.fixture(scope="module")
def extended(tmp_path_factory):
    """``extended(name)``: (base path, extended directory), each made once."""
    from hcx.data.tokenizer_extend import extend

    made = {}

    def get(name):
        if name not in made:
            base = data_root() / BASES[name]
            out = tmp_path_factory.mktemp(name) / f"{name}-ko"
            made[name] = base, extend(str(base), [KO_CORPUS], ADD, out,
                                      sample_chars=400_000, log=lambda *_: None)
        return made[name]

    return get


def open_pair(base: Path, out: Path, file: str):
    from hcx.tokenizer.loading import open_tokenizer

    return open_tokenizer(str(base)), open_tokenizer(str(out / file))


@pytest.mark.parametrize("name,file", [("mistral", "tokenizer.model"),
                                       ("mistral", "tokenizer.json"),
                                       ("polyglot", "tokenizer.json")])
def test_old_ids_and_non_korean_text_are_unchanged_and_korean_uses_new_pieces(
        extended, name, file):
    from hcx.data.tokenizer_extend import token_string

    base_path, out = extended(name)
    base, new = open_pair(base_path, out, file)
    assert new.vocab_size == base.vocab_size + ADD
    assert json.loads((out / "extension.json").read_text())["added"] == ADD
    for i in range(base.vocab_size):
        assert token_string(new, i) == token_string(base, i), i
    for text in held_out("eng_Latn") + code_sample() + ["emoji 🤖 and 中文 and  spaces\t\n"]:
        assert new.encode(text) == base.encode(text), text[:60]
    korean = held_out("kor_Hang")
    before = sum(len(base.encode(t)) for t in korean)
    ids = [new.encode(t) for t in korean]
    assert sum(map(len, ids)) < before
    assert sum(i >= base.vocab_size for row in ids for i in row) > 0.01 * sum(map(len, ids))
    assert [new.decode(row) for row in ids] == [base.decode(base.encode(t)) for t in korean]


def test_sentencepiece_twin_encodes_like_the_model(extended):
    from hcx.data.tokenizer_train import parity_mismatches

    base_path, out = extended("mistral")
    spm, hf = open_pair(base_path, out, "tokenizer.model")[1], open_pair(base_path, out, "tokenizer.json")[1]
    texts = held_out("kor_Hang") + held_out("eng_Latn") + code_sample() + [
        "한국어  두 칸   세 칸\n\n줄바꿈\t탭 ", "    들여쓰기 code = '문자열'", "숫자 2024년 5월"]
    assert parity_mismatches(spm, hf, texts) == []
    # Korean characters Mistral spells in bytes were added as pieces first
    meta = json.loads((out / "extension.json").read_text())
    assert meta["added_characters"] > 0 and meta["parity_mismatches"] == 0


def test_the_command_line_and_what_it_refuses(tmp_path):
    base = data_root() / BASES["mistral"]
    proc = hcx("tokenizer", "extend", str(base), "--corpus", KO_CORPUS, "--add", "40",
               "-o", str(tmp_path / "out"), "--sample-chars", "100000")
    assert proc.stdout.strip() == str(tmp_path / "out")
    assert (tmp_path / "out" / "tokenizer.model").is_file()
    from hcx.data.tokenizer_extend import ExtensionError, open_base

    rank_file = data_root() / "tokenizers/llama-3/tokenizer.model"
    with pytest.raises(ExtensionError, match=f"{rank_file}: a tiktoken rank file"):
        open_base(str(rank_file))


def test_mean_initialisation_by_hand():
    from hcx.interop.vocab import VocabExtension, init_rows

    weight = torch.tensor([[1.0, 0.0], [3.0, 2.0], [5.0, 4.0], [7.0, 6.0]])
    plan = VocabExtension(Path("base"), Path("ext"), Path("."), base_vocab_size=4,
                          tokenizer_vocab_size=6, vocab_size=8)
    out = init_rows(weight, plan, [[0, 1], [1, 2, 3]], "mean", torch.Generator().manual_seed(0))
    assert out.shape == (8, 2)
    assert torch.equal(out[:4], weight)
    assert torch.equal(out[4], torch.tensor([2.0, 1.0]))  # (row 0 + row 1) / 2
    assert torch.equal(out[5], torch.tensor([5.0, 4.0]))  # (rows 1 + 2 + 3) / 3
    assert torch.equal(out[6:], torch.zeros(2, 2))  # spare rows beyond the tokenizer
    rand = init_rows(weight, plan, [[0, 1], [1, 2, 3]], "random", torch.Generator().manual_seed(0))
    assert torch.equal(rand[:4], weight) and not torch.equal(rand[4:6], out[4:6])


@pytest.mark.parametrize("name", ["mistral", "polyglot"])
def test_new_tokens_split_into_base_pieces_of_the_same_text(extended, tmp_path, name):
    from hcx.interop.vocab import base_pieces, plan_extension
    from hcx.tokenizer.loading import open_tokenizer

    base_path, out = extended(name)
    hf_dir = base_path if base_path.is_dir() else tmp_path
    if not base_path.is_dir():
        (tmp_path / "tokenizer.model").write_bytes(base_path.read_bytes())
    base_vocab = open_tokenizer(str(hf_dir)).vocab_size
    plan = plan_extension(hf_dir, base_vocab, out)
    assert (plan.base_vocab_size, plan.vocab_size) == (base_vocab, base_vocab + ADD)
    pieces = base_pieces(plan)
    ext = open_tokenizer(str(out))
    base = open_tokenizer(str(hf_dir))
    for new_id, ids in zip(plan.new_ids(), pieces):
        assert ids and all(i < base_vocab for i in ids)
        assert base.decode(ids) == ext.decode([new_id]), new_id


def test_a_tokenizer_that_is_not_an_extension_is_refused_naming_the_file(extended, tmp_path):
    from hcx.interop.vocab import VocabError, plan_extension

    base_path, out = extended("polyglot")
    with pytest.raises(VocabError, match=f"{base_path / 'tokenizer.json'}: .* not more than"):
        plan_extension(out, 200_000, base_path)  # the base is smaller than the "model's"
    other = tmp_path / "other"
    other.mkdir()
    data = json.loads((out / "tokenizer.json").read_text())
    data["model"]["vocab"] = {k: {5: 6, 6: 5}.get(v, v) for k, v in data["model"]["vocab"].items()}
    (other / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(VocabError, match=f"{other / 'tokenizer.json'}: id 5 is"):
        plan_extension(base_path, 30_080, other)
    with pytest.raises(VocabError, match="config.json vocab_size is 1,000"):
        plan_extension(base_path, 1000, out)
