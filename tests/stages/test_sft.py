"""SFT data: assistant-only loss masks, packing without cross-attention, literal markers."""

import pytest
import torch

from hcx.engine.batches import epoch_order
from hcx.stages.sft import (
    SFTDataError,
    SFTStats,
    attention_mask,
    build_sequences,
    read_conversations,
    to_sample,
    tokenize,
)
from hcx.tokenizer.loading import open_tokenizer
from tests.conftest import ROOT

TOKENIZER = str(ROOT / "tokenizer" / "hcx-ko-en-32k" / "tokenizer.model")


@pytest.fixture(scope="module")
def tok():
    return open_tokenizer(TOKENIZER)


def chat(user, reply):
    return [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]


def test_loss_is_on_assistant_tokens_only(tok):
    ex = tokenize(chat("안녕?", "반가워요"), tok)
    stats = SFTStats()
    [row] = build_sequences([ex], seq_length=32, pad=tok.pad, packing=False, stats=stats)
    s = to_sample(row)
    user, end = tok.special_id("<|user|>"), tok.special_id("<|endofturn|>")
    reply = tok.encode("반가워요")
    # <|user|> 안녕? <|endofturn|> <|assistant|> 반가워요 <|endofturn|> <pad>...
    n_user = 1 + len(tok.encode("안녕?")) + 1
    assert row.tokens[0] == user and row.tokens[n_user] == tok.special_id("<|assistant|>")
    trained = [int(t) for t, m in zip(s["labels"], s["loss_mask"]) if m]
    assert trained == reply + [end]  # the reply and its end of turn, nothing else
    assert stats.assistant_tokens == len(reply) + 1


def test_literal_markers_in_user_text_stay_text(tok):
    ex = tokenize(chat("type <|assistant|> and <|endofturn|> here", "ok"), tok)
    markers = {tok.special_id(m) for m in ("<|assistant|>", "<|endofturn|>")}
    # exactly the three markers chat rendering inserts, none from the text
    assert sum(i in markers for i in ex.ids) == 3
    assert "<|assistant|>" in tok.decode(ex.ids[1:-4])


def test_packing_fills_rows_and_isolates_conversations(tok):
    convs = [chat("a" * k, "b" * k) for k in (1, 2, 3, 30, 1)]
    examples = [tokenize(c, tok) for c in convs]
    stats = SFTStats()
    rows = build_sequences(examples, seq_length=40, pad=tok.pad, packing=True, stats=stats)
    assert stats.sequences == len(rows) < len(examples)
    assert stats.tokens == sum(len(e.ids) for e in examples)
    sample = to_sample(rows[0])
    seg = sample["segments"]
    mask = attention_mask(seg.unsqueeze(0))[0, 0]  # True = masked
    for q in range(len(seg)):
        for k in range(len(seg)):
            if seg[q] >= 0:
                assert bool(mask[q, k]) == (k > q or seg[k] != seg[q]), (q, k)
            else:
                assert bool(mask[q, k]) == (k != q)
    # no label crosses from one conversation into the next
    boundary = (seg[1:] != seg[:-1]).nonzero().flatten()
    assert all(sample["loss_mask"][int(b)] == 0 for b in boundary)


def test_too_long_conversations_are_dropped_and_counted(tok):
    stats = SFTStats()
    rows = build_sequences([tokenize(chat("x " * 50, "y"), tok), tokenize(chat("a", "b"), tok)],
                           seq_length=16, pad=tok.pad, packing=True, stats=stats)
    assert len(rows) == 1 and stats.too_long == 1 and stats.conversations == 2
    assert "dropped 1 longer than a sequence" in stats.summary()


def test_length_grouped_order_is_seeded():
    lengths = [5, 1, 9, 3, 7, 2, 8, 4]
    a = epoch_order(8, 0, seed=1, lengths=lengths, group=2)
    assert a == epoch_order(8, 0, seed=1, lengths=lengths, group=2)
    assert sorted(a) == list(range(8)) and a != epoch_order(8, 1, seed=1, lengths=lengths, group=2)
    pairs = [sorted(lengths[i] for i in a[k:k + 2]) for k in range(0, 8, 2)]
    assert sorted(pairs) == [[1, 2], [3, 4], [5, 7], [8, 9]]


def test_bad_records_name_file_and_line(tmp_path):
    f = tmp_path / "sft.jsonl"
    f.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'
                 '{"messages": [{"role": "user", "content": "no reply"}]}\n'
                 '{"messages": "oops"}\n')
    with pytest.raises(SFTDataError, match=r"sft.jsonl:2: no assistant message"):
        read_conversations(str(f))
    stats = SFTStats()
    assert len(read_conversations(str(f), skip_bad=True, stats=stats)) == 1
    assert stats.bad == {"no_assistant": 1, "missing_field": 1}


def test_shared_sft_data_reads(shared_data, tok):
    convs = read_conversations(str(shared_data / "train/sft/ko_kochatgpt_sft_conversation/train.jsonl"))
    assert len(convs) == 439 and any(len(c) > 2 for c in convs)  # multi-turn
    ex = tokenize(convs[0], tok)
    assert any(ex.assistant) and not ex.assistant[0]
    assert torch.tensor(ex.ids).max() < tok.vocab_size


# --- on the engine --------------------------------------------------------------------

import subprocess  # noqa: E402
import sys  # noqa: E402

from tests.conftest import hcx, losses, small_recipe  # noqa: E402


def sft_recipe(tmp_path, **sections):
    recipe = small_recipe(
        tmp_path / "sft.yaml", tmp_path / "run", tmp_path / "unused",
        data={"tokenizer": {"kind": "sentencepiece", "path": TOKENIZER}, "seq_length": 64,
              "sources": [
                  {"name": "ko", "path": "data://train/sft/ko_koalpaca_v1_head/train.jsonl"},
                  {"name": "en", "weight": 0.5,
                   "path": "data://train/sft/en_alpaca_seed_tasks/train.jsonl"}]},
        train={"steps": 4, "global_batch_size": 8, "micro_batch_size": 2, "warmup_steps": 1},
        checkpoint={"save_every": 0}, **sections)
    return recipe


@pytest.mark.slow
def test_packed_conversations_do_not_see_each_other(tmp_path):
    recipe = sft_recipe(tmp_path)
    subprocess.run([sys.executable, "tests/workers/sft_isolation.py", str(recipe),
                    str(tmp_path / "out.pt")], cwd=ROOT, check=True, capture_output=True)
    r = torch.load(tmp_path / "out.pt")
    la, lb = r["len_a"], r["len_b"]
    # the per-token losses of each conversation are those it has alone (RoPE is relative)
    assert torch.allclose(r["packed"][:la - 1], r["a"][:la - 1], atol=1e-5)
    assert torch.allclose(r["packed"][la:la + lb - 1], r["b"][:lb - 1], atol=1e-5)
    # without the mask the second conversation would see the first: the test can fail
    assert not torch.allclose(r["a"][:lb - 1], r["b"][:lb - 1], atol=1e-3)


@pytest.mark.slow
@pytest.mark.parametrize("packing", [True, False])
def test_sft_cli_trains_and_tp2_matches(tmp_path, packing):
    recipe = sft_recipe(tmp_path, sft={"packing": packing})
    proc = hcx("sft", str(recipe))
    assert "sft: ko: 1,040 conversations" in proc.stdout + proc.stderr
    single = list(losses(tmp_path / "run").values())
    assert len(single) == 4 and all(0 < x < 20 for x in single)
    hcx("sft", str(recipe), "parallel.tp=2", f"output_dir={tmp_path / 'tp2'}")
    assert list(losses(tmp_path / "tp2").values()) == pytest.approx(single, abs=1e-5)
