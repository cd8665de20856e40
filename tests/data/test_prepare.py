"""hcx data prepare: cleaning, dedup, PII, decontamination, FIM, bad input, interruption."""

import json
import signal
import subprocess
import sys
import time
import unicodedata
from pathlib import Path

import numpy as np
import pytest
import yaml

from hcx.tokenizer import special_tokens as st
from tests.conftest import ROOT, TINY, hcx

TOKENIZER = ROOT / "tokenizer" / "hcx-ko-en-32k" / "tokenizer.model"

KO = ("대한민국은 민주공화국이다. 대한민국의 주권은 국민에게 있고, 모든 권력은 국민으로부터 나온다. "
      "국가는 법률이 정하는 바에 의하여 재외국민을 보호할 의무를 진다. ")
EN = ("Call me Ishmael. Some years ago, never mind how long precisely, having little or no "
      "money in my purse, and nothing particular to interest me on shore, I thought I would "
      "sail about a little and see the watery part of the world. ")


def words(seed: int, n: int = 400) -> str:
    """A long English-like document of distinct words (for near-duplicate tests)."""
    rng = np.random.default_rng(seed)
    vocab = ["river", "mountain", "letter", "window", "garden", "silver", "market", "winter",
             "harbor", "engine", "signal", "forest", "bridge", "candle", "pepper", "meadow"]
    return " ".join(rng.choice(vocab) + str(int(rng.integers(0, 50))) for _ in range(n)) + "."


def write_jsonl(path: Path, texts: list[str], field: str = "text") -> Path:
    path.write_text("".join(json.dumps({field: t}, ensure_ascii=False) + "\n" for t in texts),
                    encoding="utf-8")
    return path


def make_recipe(tmp: Path, sources: list[dict], **prepare) -> Path:
    recipe = {"base": str(TINY), "name": "prep", "output_dir": str(tmp / "run"),
              "data": {"tokenizer": {"kind": "sentencepiece", "path": str(TOKENIZER)},
                       "sources": sources,
                       "prepare": {"workers": 1, "decontaminate": None, **prepare}}}
    path = tmp / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, allow_unicode=True))
    return path


def prepared(tmp: Path) -> Path:
    return tmp / "run" / "data_cache" / "prepared"


def documents(prefix: Path) -> list[list[int]]:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(str(prefix))
    return [ds[i].tolist() for i in range(len(ds))]


def decode(ids: list[int]) -> str:
    from hcx.tokenizer.loading import SentencePieceTokenizer

    return SentencePieceTokenizer(TOKENIZER).decode(ids)


def stats(tmp: Path) -> dict:
    return {s["name"]: s for s in json.loads((prepared(tmp) / "stats.json").read_text())["sources"]}


def test_cleaning_dedup_and_pii(tmp_path):
    nfd = unicodedata.normalize("NFD", KO)  # decomposed jamo, as some Mac files have
    assert any("\u1100" <= c <= "\u11ff" for c in nfd)
    near = words(1)
    near_copy = near.replace("river", "stream", 3)  # a few words changed
    a = write_jsonl(tmp_path / "a.jsonl", [
        nfd + "\x00\x07제어\u200b문자",
        KO + " 문의: hong.gildong+news@naver.com, 010-1234-5678, 주민번호 900101-1234567.",
        near,
        "short",
    ])
    b = write_jsonl(tmp_path / "b.jsonl", [
        KO + " 문의: hong.gildong+news@naver.com, 010-1234-5678, 주민번호 900101-1234567.",  # exact dup of a[1]
        near_copy,                                                                          # near dup of a[2]
        EN,
    ])
    recipe = make_recipe(tmp_path, [{"name": "a", "language": "any", "path": str(a)},
                                    {"name": "b", "language": "any", "path": str(b)}])
    proc = hcx("data", "prepare", str(recipe))
    assert "| a | any |" in proc.stdout  # the Markdown report is printed
    docs_a = [decode(d[:-1]) for d in documents(prepared(tmp_path) / "a")]
    docs_b = [decode(d[:-1]) for d in documents(prepared(tmp_path) / "b")]
    assert all(d[-1] == 3 for d in documents(prepared(tmp_path) / "a"))  # eod = </s>
    assert docs_a[0] == KO + "제어문자"  # NFC, control and zero-width characters removed
    assert not any("\u1100" <= c <= "\u11ff" for d in docs_a for c in d)
    assert "[EMAIL]@naver.com" in docs_a[1] and "hong.gildong" not in docs_a[1]
    assert "[PHONE]" in docs_a[1] and "[RRN]" in docs_a[1] and "1234567" not in docs_a[1]
    assert docs_b == [EN]  # both duplicates removed from the later source
    s = stats(tmp_path)
    assert s["a"]["removed"] == {"too_short": 1}
    assert s["b"]["removed"] == {"exact_duplicate": 1, "near_duplicate": 1}
    assert s["a"]["pii_masked"] == {"email": 1, "phone": 1, "rrn": 1}
    assert s["a"]["documents"] == 3 and s["b"]["documents"] == 1
    assert s["a"]["tokens"] == sum(len(d) for d in documents(prepared(tmp_path) / "a"))
    assert s["a"]["tokens_by_language"]["ko"] > 0 and s["b"]["tokens_by_language"] == {"en": s["b"]["tokens"]}
    # pretrain finds the prepared data without preparing again
    from hcx.config import load_recipe
    from hcx.data.prepare import is_prepared

    assert is_prepared(load_recipe(recipe))


def test_decontamination_drops_and_reports_per_benchmark(tmp_path):
    evals = tmp_path / "eval"
    (evals / "fakebench").mkdir(parents=True)
    (evals / "otherbench").mkdir()
    question = ("Which of the following best describes the role of the mitochondria "
                "in a eukaryotic cell during aerobic respiration and energy production?")
    write_jsonl(evals / "fakebench" / "test.jsonl", [question], field="question")
    write_jsonl(evals / "otherbench" / "test.jsonl", ["an unrelated evaluation passage " * 3])
    train = write_jsonl(tmp_path / "train.jsonl", [
        EN + " Quiz: " + question.lower().capitalize() + " Answer below.",   # quotes 13+ words
        EN + " " + " ".join(question.split()[:12]) + " and so on.",          # only 12 words
        words(2),
    ])
    src = [{"name": "t", "language": "en", "path": str(train)}]
    recipe = make_recipe(tmp_path, src, decontaminate={"eval_dir": str(evals), "ngram": 13})
    proc = hcx("data", "prepare", str(recipe))
    s = stats(tmp_path)["t"]
    assert s["removed"] == {"contaminated": 1}
    assert s["contaminated_documents_by_benchmark"] == {"fakebench": 1}
    assert "| fakebench | 1 |" in proc.stdout
    assert len(documents(prepared(tmp_path) / "t")) == 2
    # an edited eval set makes the prepared data stale; a changed blend weight does not
    from hcx.config import load_recipe
    from hcx.data.prepare import is_prepared

    recipe_path = make_recipe(tmp_path, src, decontaminate={"eval_dir": str(evals), "ngram": 13})
    assert is_prepared(load_recipe(recipe_path, ["data.sources.0.weight=3"]))
    write_jsonl(evals / "otherbench" / "test.jsonl", ["an edited evaluation passage " * 3])
    assert not is_prepared(load_recipe(recipe_path))
    # report-only keeps the document and still counts it
    recipe = make_recipe(tmp_path, src, decontaminate={"eval_dir": str(evals), "action": "report"})
    hcx("data", "prepare", str(recipe))
    assert stats(tmp_path)["t"]["contaminated_documents_by_benchmark"] == {"fakebench": 1}
    assert len(documents(prepared(tmp_path) / "t")) == 3


@pytest.mark.parametrize("tokenizer", ["hcx", "llama-2", "bytes"])
def test_words_are_found_whatever_the_tokenizer(tokenizer, shared_data):
    """Decontamination counts n-grams in words; tokenizers that drop a leading space
    when a token is decoded alone (SentencePiece with a dummy prefix) must work too."""
    from hcx.data.corpus.decontam import word_hashes
    from hcx.data.prepare import word_start_table
    from hcx.tokenizer.loading import open_tokenizer

    spec = {"hcx": str(TOKENIZER), "bytes": "bytes",
            "llama-2": str(shared_data / "tokenizers/llama-2/tokenizer.model")}[tokenizer]
    if tokenizer == "llama-2" and not Path(spec).exists():
        pytest.skip("no llama-2 reference tokenizer")
    tok = open_tokenizer(spec)
    table = word_start_table(tok)
    ids = np.asarray(tok.encode("the quick brown fox jumps over 한국어 모델입니다"), np.int64)
    assert len(word_hashes(ids, table)) == 8


def test_fim_layouts(tmp_path):
    from hcx.tokenizer.loading import SentencePieceTokenizer

    tok = SentencePieceTokenizer(TOKENIZER)
    pre, mid, suf = (tok.special_id(t) for t in (st.FIM_PREFIX, st.FIM_MIDDLE, st.FIM_SUFFIX))
    code = tmp_path / "code"
    code.mkdir()
    texts = {f"m{i}.py": f"def f{i}(x):\n    y = x * {i}\n    return y + {i * 7}\n\n\nprint(f{i}(3))\n"
             for i in range(30)}
    for name, text in texts.items():
        (code / name).write_text(text)
    in_order = [texts[name] for name in sorted(texts)]  # files are read in sorted order
    src = [{"name": "code", "language": "code", "path": str(code), "include": "*.py"}]
    # PSM at fixed thirds: [PRE] prefix [SUF] suffix [MID] middle eod, exactly
    hcx("data", "prepare", str(make_recipe(
        tmp_path, src, dedup={"near": False}, fim={"rate": 1.0, "spm_rate": 0.0, "random_split_rate": 0.0})))
    docs = documents(prepared(tmp_path) / "code")
    for doc, text in zip(docs, in_order):
        n = len(text)
        p, m, s = text[:n // 3], text[n // 3:2 * n // 3], text[2 * n // 3:]
        assert doc == [pre, *tok.encode(p), suf, *tok.encode(s), mid, *tok.encode(m), tok.eod]
    # SPM with random cuts: [PRE] [SUF] suffix [MID] prefix middle; text reassembles
    hcx("data", "prepare", str(make_recipe(
        tmp_path, src, dedup={"near": False}, fim={"rate": 1.0, "spm_rate": 1.0, "random_split_rate": 1.0})))
    docs = documents(prepared(tmp_path) / "code")
    cuts = set()
    for doc, text in zip(docs, in_order):
        assert doc[:2] == [pre, suf] and doc[-1] == tok.eod and doc.count(mid) == 1
        k = doc.index(mid)
        suffix, prefix_middle = decode(doc[2:k]), decode(doc[k + 1:-1])
        assert prefix_middle + suffix == text
        cuts.add(len(suffix))
    assert len(cuts) > 5  # random cut points, not fixed ones
    assert sum(stats(tmp_path)["code"]["fim"].values()) == 30
    # rate 0: plain documents
    hcx("data", "prepare", str(make_recipe(tmp_path, src, dedup={"near": False}, fim={"rate": 0.0})))
    assert [decode(d[:-1]) for d in documents(prepared(tmp_path) / "code")] == in_order


def test_output_does_not_depend_on_the_number_of_workers(tmp_path, shared_data):
    """Including the random FIM choices (seeded per record) and dedup across sources."""
    code = tmp_path / "code"
    code.mkdir()
    for i in range(40):
        (code / f"m{i:02d}.py").write_text(f"def f{i}(x):\n    return x * {i} + {i * i}\n" * (1 + i % 4))
    src = [{"name": "ko", "language": "ko", "path": "data://train/pretrain/ko_konlpy_kolaw_kobill/train.jsonl"},
           {"name": "en", "language": "en", "path": "data://train/pretrain/en_tiny_shakespeare/train.jsonl"},
           {"name": "code", "language": "code", "path": str(code), "include": "*.py"}]
    out = {}
    for workers in (1, 2):
        tmp = tmp_path / f"w{workers}"
        tmp.mkdir()
        hcx("data", "prepare", str(make_recipe(tmp, src, workers=workers)))
        out[workers] = [(prepared(tmp) / f"{n}{ext}").read_bytes()
                        for n in ("ko", "en", "code") for ext in (".bin", ".idx")]
        assert sum(stats(tmp)["code"]["fim"].values()) > 5
    assert out[1] == out[2]


@pytest.mark.parametrize("content, line, message", [
    (b'{"text": "fine document number one, long enough"}\n{"text": "broken\n', 2, "malformed JSON"),
    (b'{"text": "fine document number one, long enough"}\n{"text": "\xff\xfe bad"}\n', 2, "invalid UTF-8"),
    (b'{"text": "fine document number one, long enough"}\n\n{"body": "no text field here"}\n', 3,
     "no field 'text' (has ['body'])"),
    (b'{"text": "fine document number one, long enough"}\n{"text": "half a pair \\ud800 of surrogates"}\n',
     2, "field 'text' holds an unpaired surrogate"),
    (b"", 1, "empty file"),
])
def test_bad_input_names_file_and_line_or_is_counted(tmp_path, content, line, message):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(content)
    good = write_jsonl(tmp_path / "good.jsonl", [EN])
    recipe = make_recipe(tmp_path, [{"name": "good", "path": str(good)}, {"name": "bad", "path": str(bad)}])
    proc = hcx("data", "prepare", str(recipe), check=False)
    assert proc.returncode == 1, proc.stderr
    assert f"{bad}:{line}: {message}" in proc.stderr and "--skip-bad" in proc.stderr
    assert "Traceback" not in proc.stderr
    out = prepared(tmp_path)
    assert not (out / "manifest.json").exists()          # the engine will not take it
    assert not (out / "bad.idx").exists() and not list(out.glob("*.tmp*"))
    if content:
        proc = hcx("data", "prepare", str(recipe), "--skip-bad")
        counted = stats(tmp_path)["bad"]["removed"]
        assert sum(v for k, v in counted.items() if k.startswith("bad_")) == 1
        assert stats(tmp_path)["bad"]["removed_examples"][next(iter(counted))] == [f"{bad}:{line}"]


def work_files(out: Path, pattern: str) -> list[Path]:
    """Files of a run's datatrove work directory (``<prepared>/work/<run>/``)."""
    return list(out.glob(f"work/*/{pattern}")) if out.exists() else []


def test_sigkill_mid_task_then_rerun_resumes_with_identical_output(tmp_path, shared_data):
    """SIGKILL while a task writes: nothing the engine accepts is left; a rerun skips the
    tasks datatrove marked complete and writes the same bytes as an uninterrupted run."""
    big = tmp_path / "big.jsonl"
    texts = [json.loads(x)["text"] for x in
             (shared_data / "train/pretrain/ko_legalize_kr_precedents/train.jsonl").read_text().splitlines()]
    write_jsonl(big, texts)
    src = [{"name": "big", "language": "ko", "path": str(big)}]
    recipe = make_recipe(tmp_path, src, executor={"shard_mb": 2})
    proc = subprocess.Popen([sys.executable, "-m", "hcx.cli", "data", "prepare", str(recipe)],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    out = prepared(tmp_path)
    deadline = time.time() + 120
    while time.time() < deadline:  # kill while a task writes, after one has finished
        done = work_files(out, "logs/process/completions/*")
        partial = [f for f in work_files(out, "docs/*.tmp*.bin") if f.stat().st_size > 0]
        if done and partial:
            break
        time.sleep(0.02)
    else:
        pytest.fail("prepare never finished a task and started the next")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "big.idx").exists() and not (out / "manifest.json").exists()
    from hcx.config import load_recipe
    from hcx.data.prepare import is_prepared

    assert not is_prepared(load_recipe(recipe))
    rerun = hcx("data", "prepare", str(recipe))  # a rerun continues and completes
    assert "already processed by an earlier run" in rerun.stderr
    assert not list(out.glob("*.tmp*")) and not work_files(out, "*")  # work files removed
    assert len(documents(out / "big")) == stats(tmp_path)["big"]["documents"] > 1000
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    hcx("data", "prepare", str(make_recipe(fresh, src, executor={"shard_mb": 2}, workers=2)))
    for ext in (".bin", ".idx"):
        assert (out / f"big{ext}").read_bytes() == (prepared(fresh) / f"big{ext}").read_bytes()


@pytest.mark.parametrize("workers", [1, 2])
def test_sigterm_cleans_up(tmp_path, shared_data, workers):
    recipe = make_recipe(tmp_path, [{"name": "big", "language": "ko",
                                     "path": "data://train/pretrain/ko_legalize_kr_precedents/train.jsonl"}],
                         workers=workers, executor={"shard_mb": 2})
    proc = subprocess.Popen([sys.executable, "-m", "hcx.cli", "data", "prepare", str(recipe)],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    out = prepared(tmp_path)
    deadline = time.time() + 120
    while not work_files(out, "docs/*.tmp*.bin") and time.time() < deadline:
        time.sleep(0.02)
    assert work_files(out, "docs/*.tmp*.bin"), "prepare never started writing"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert "Traceback" not in err
    assert "stopped by signal 15" in err
    assert not list(out.glob("big*")) and not (out / "manifest.json").exists()


def test_tiny_recipe_trains_on_prepared_data_with_the_shipped_tokenizer(tmp_path, shared_data):
    """The done-when of the corpus stage: prepare (with FIM code and decontamination)
    then pretrain on it, through the CLI."""
    run = tmp_path / "run"
    overrides = [f"output_dir={run}", "model.num_layers=2", "train.steps=3",
                 "train.global_batch_size=4", "train.micro_batch_size=2", "train.warmup_steps=1",
                 "data.eval_every=0",
                 "checkpoint.save_every=0", "logging.progress=false"]
    proc = hcx("data", "prepare", str(TINY), *overrides)
    assert "| code_python | code |" in proc.stdout and "Fill-in-the-middle documents" in proc.stdout
    proc = hcx("pretrain", str(TINY), *overrides)
    assert "preparing data" not in proc.stdout  # used what prepare wrote
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3]
    assert metrics[0]["loss"] == pytest.approx(np.log(32768), abs=0.5)  # untrained 32k vocabulary


def test_a_byte_order_mark_on_line_one_is_not_malformed_json(tmp_path):
    from hcx.data.sources import parse_record, raw_records

    f = tmp_path / "bom.jsonl"
    f.write_bytes(b'\xef\xbb\xbf{"text": "a"}\n{"text": "b"}\n')
    assert [parse_record(r) for r in raw_records(f, "jsonl")] == ["a", "b"]


def test_excludes_are_relative_to_a_directory_or_a_glob(tmp_path):
    from hcx.data.sources import expand

    for sub in ("keep", "test", "deep/test"):
        (tmp_path / sub).mkdir(parents=True)
        (tmp_path / sub / "x.py").write_text("x = 1\n")
    rel = lambda files: sorted(str(f.relative_to(tmp_path)) for f in files)  # noqa: E731
    assert rel(expand(str(tmp_path), "*.py", ["test/*"])) == ["deep/test/x.py", "keep/x.py"]
    assert rel(expand(str(tmp_path / "*" / "x.py"), exclude=["test/*"])) == ["keep/x.py"]
