"""hcx tokenizer train: SentencePiece + its Hugging Face twin, special tokens, morphemes."""

import json
from pathlib import Path

import pytest
import sentencepiece as spm

from hcx.tokenizer import special_tokens as st
from tests.conftest import ROOT, hcx

SHIPPED = ROOT / "tokenizer" / "hcx-ko-en-32k"
SPEC = ROOT / "tokenizer" / "hcx-ko-en-32k.yaml"

TEXTS = {
    "korean": "한국어를 배우는 모델입니다. 대한민국 헌법 제1조 ① 대한민국은 민주공화국이다.",
    "english": "The quick brown fox jumps over the lazy dog; it's 3.14159 (approx.) in 2024!",
    "code": "def f(x: int) -> dict:\n\tif x:\n        return {'a': 1_000, \"b\": [x ** 2]}\n\n\n",
    "emoji": "좋아요 😀👍🏽 👨‍👩‍👧‍👦 🇰🇷 ❤️",
    "mixed scripts": "漢字 한자 かな Привет עברית العربية ελληνικά हिन्दी Ω≈ç√∫",
    "whitespace runs": " " * 37 + "x" + "\n" * 5 + "\t\t\t  \t" + " " * 3 + "\n y  ",
    # (special-token strings such as "<unk>" are matched by HF tokenizers by design)
    "byte-looking text": "<0x41> ▁ <0xZZ> \\u00e9 \x01 control",
}


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """Two small tokenizers from the real spec: morpheme-aware and not (same sample)."""
    out = tmp_path_factory.mktemp("tok")
    common = ["vocab_size=2000", "sample_chars=600000", "threads=2"]
    for name, aware in (("aware", "true"), ("plain", "false")):
        hcx("tokenizer", "train", str(SPEC), *common, f"name={name}",
            f"output_dir={out / name}", f"morpheme_aware={aware}")
    return out


def sp_and_hf(directory: Path):
    from transformers import AutoTokenizer

    return (spm.SentencePieceProcessor(model_file=str(directory / "tokenizer.model")),
            AutoTokenizer.from_pretrained(str(directory)))


@pytest.mark.parametrize("which", ["shipped", "small"])
def test_hf_tokenizer_encodes_and_decodes_like_sentencepiece(which, small, shared_data):
    sp, hf = sp_and_hf(SHIPPED if which == "shipped" else small / "aware")
    texts = dict(TEXTS)
    rows = [json.loads(x) for x in (shared_data / "eval/flores200_kor_eng/dev.jsonl").read_text().splitlines()[:100]]
    texts["flores ko"] = "\n".join(r["kor_Hang"] for r in rows)
    texts["flores en"] = "\n".join(r["eng_Latn"] for r in rows)
    texts["stdlib code"] = Path(json.__file__).read_text()
    for name, text in texts.items():
        ids = sp.encode(text)
        assert hf.encode(text) == ids, name
        expected = text.replace("\u2581", " ")  # U+2581 is SentencePiece's space, in both
        assert sp.decode(ids) == expected, name
        assert hf.decode(ids) == expected, name


def test_special_tokens_have_fixed_ids_and_text_never_becomes_one():
    sp, hf = sp_and_hf(SHIPPED)
    assert [sp.id_to_piece(i) for i in range(4)] == [st.PAD, st.UNK, st.BOS, st.EOS]
    assert (sp.pad_id(), sp.unk_id(), sp.bos_id(), sp.eos_id()) == (0, 1, 2, 3)
    control = {tok: sp.piece_to_id(tok) for tok in st.CONTROL_SYMBOLS}
    assert all(sp.is_control(i) for i in control.values())
    assert len(set(control.values())) == len(st.CONTROL_SYMBOLS)
    for tok, i in control.items():  # same ids on the HF side, marked special
        assert hf.convert_tokens_to_ids(tok) == i
    assert (hf.pad_token_id, hf.bos_token_id, hf.eos_token_id) == (0, 2, 3)
    # A user typing a marker gets text, not the marker (SentencePiece control symbols).
    ids = sp.encode("<|user|> hi <|fim_prefix|>")
    assert not set(ids) & set(control.values())
    assert sp.decode(ids) == "<|user|> hi <|fim_prefix|>"
    assert sp.encode("a\nb") == [sp.piece_to_id("a"), sp.piece_to_id("\n"), sp.piece_to_id("b")]
    assert hf.encode("x") == sp.encode("x")  # no BOS/EOS added on either side


def test_digits_are_single_tokens_and_indentation_is_kept():
    sp = spm.SentencePieceProcessor(model_file=str(SHIPPED / "tokenizer.model"))
    pieces = sp.encode("2024년 12345 3.14", out_type=str)
    digits = [p for p in pieces if any(c.isdigit() for c in p)]
    assert all(len(p.lstrip("\u2581")) == 1 for p in digits), pieces
    code = "class A:\n    def f(self):\n        return 1\n"
    assert sp.decode(sp.encode(code)) == code
    assert "▁▁▁▁▁▁▁▁" in sp.encode(code, out_type=str)  # an 8-space indent is one piece


def test_chat_template_renders_the_markers():
    _, hf = sp_and_hf(SHIPPED)
    messages = [{"role": "system", "content": "간결하게."}, {"role": "user", "content": "안녕?"}]
    text = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == "<|system|>간결하게.<|endofturn|><|user|>안녕?<|endofturn|><|assistant|>"


def test_morpheme_aware_pieces_cross_fewer_morpheme_boundaries(small, shared_data):
    """Trained with kiwipiepy boundaries, multi-character pieces span a morpheme boundary
    of plain text (encoded with no analyzer) far less often than when trained without
    (measured: 8% against 18%)."""
    from kiwipiepy import Kiwi

    from hcx.data.tokenizer_train import morpheme_boundaries

    rows = [json.loads(x) for x in (shared_data / "eval/flores200_kor_eng/dev.jsonl").read_text().splitlines()[:150]]
    texts = [r["kor_Hang"] for r in rows]
    kiwi = Kiwi()
    cuts = [set(morpheme_boundaries(t, toks)) for t, toks in zip(texts, kiwi.tokenize(texts))]

    def crossing_rate(directory):
        sp = spm.SentencePieceProcessor(model_file=str(directory / "tokenizer.model"))
        crossing = total = 0
        for text, boundaries in zip(texts, cuts):
            pos = 0
            for piece in sp.encode(text, out_type=str):
                n = len(piece) if not piece.startswith("<0x") else 0
                if len(piece.strip("\u2581")) >= 2:
                    crossing += any(b in boundaries for b in range(pos + 1, pos + n))
                    total += 1
                pos += n
        return crossing / total

    aware, plain = crossing_rate(small / "aware"), crossing_rate(small / "plain")
    assert aware < 0.6 * plain, (aware, plain)


def test_overlapping_kiwi_tokens_give_one_boundary():
    """입니다 is 이 (0,1) + ᆸ니다 (0,3): the contracted ending starts inside the first token."""
    from kiwipiepy import Kiwi

    from hcx.data.tokenizer_train import morpheme_boundaries

    text = "모델입니다"
    cuts = morpheme_boundaries(text, Kiwi().tokenize(text))
    assert cuts == [2]  # 모델 | 입니다: nothing inside the contracted syllable 입


def test_spec_errors_name_the_line(tmp_path):
    spec = tmp_path / "bad.yaml"
    spec.write_text("name: x\nvocab_sise: 1000\nsources:\n  - {name: a, language: ko, path: a.txt}\n")
    proc = hcx("tokenizer", "train", str(spec), check=False)
    assert proc.returncode == 2
    assert f"{spec}:2" in proc.stderr and "did you mean 'vocab_size'" in proc.stderr
    spec.write_text("name: x\nlanguage_ratios: {ko: 1.0}\nsources:\n  - {name: a, language: en, path: a.txt}\n")
    proc = hcx("tokenizer", "train", str(spec), check=False)
    assert "'en' but language_ratios gives that language no share" in proc.stderr


def test_a_large_corpus_is_sampled_across_all_its_files(tmp_path):
    """A corpus much larger than the sample is drawn from pieces spread over all its
    files and shards, not read from the start until the budget is met."""
    shards = tmp_path / "ko"
    shards.mkdir()
    for i in range(4):  # 4 shards of ~500 KB, each document naming its shard
        lines = [json.dumps({"text": f"샤드{i} 문서{j} " + "가나다라마바사 " * 60}, ensure_ascii=False)
                 for j in range(400)]
        (shards / f"part-{i}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    from hcx.data.tokenizer_train import CorpusSource, language_documents

    source = CorpusSource(name="ko", path=str(shards), language="ko", include="*.jsonl")
    docs = language_documents([source], 20_000)   # the corpus is ~100x larger
    assert 20_000 <= sum(map(len, docs)) < 40_000
    assert {d.split()[0] for d in docs} == {"샤드0", "샤드1", "샤드2", "샤드3"}
    # ... and from inside the shards, not only from their first lines
    assert max(int(d.split()[1][2:]) for d in docs) > 200
    # a corpus not much larger than the sample is read from its start, as before
    docs = language_documents([source], 100_000)
    assert {d.split()[0] for d in docs} == {"샤드0"}
