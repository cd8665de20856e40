"""Alignment: preference data, and hcx align on the shared engine (every method, TP/PP,
reference log-probs precomputed or live, BCO's delta in checkpoints)."""

import json
from pathlib import Path

import pytest
import torch

from hcx.stages import preference as P
from hcx.engine.scoring import sequence_logps
from hcx.stages.align import metric_counts
from hcx.tokenizer.loading import open_tokenizer
from tests.conftest import ROOT, hcx, losses, small_recipe

TOKENIZER = str(ROOT / "tokenizer" / "hcx-ko-en-32k" / "tokenizer.model")


@pytest.fixture(scope="module")
def tok():
    return open_tokenizer(TOKENIZER)


def user(text):
    return [{"role": "user", "content": text}]


def reply(text):
    return [{"role": "assistant", "content": text}]


# --- records and rows --------------------------------------------------------------------


def test_paired_record_is_one_example_or_two_unpaired():
    rec = {"prompt": user("Hi"), "chosen": reply("Hello!"), "rejected": reply("Go away.")}
    (item,) = P.parse_preference(rec, "f:1", unpaired=False)
    assert item == (user("Hi"), [reply("Hello!"), reply("Go away.")], True)
    good, bad = P.parse_preference(rec, "f:1", unpaired=True)
    assert good == (user("Hi"), [reply("Hello!")], True)
    assert bad == (user("Hi"), [reply("Go away.")], False)
    # strings are one user turn and one assistant turn
    (item,) = P.parse_preference({"prompt": "Hi", "chosen": "a", "rejected": "b"}, "f:1", False)
    assert item[0] == user("Hi") and item[1] == [reply("a"), reply("b")]


@pytest.mark.parametrize("record, unpaired, message", [
    ({"chosen": "a", "rejected": "b"}, False, "no 'prompt' field"),
    ({"prompt": "p", "chosen": "a"}, False, "needs both 'chosen' and 'rejected'"),
    ({"prompt": "p", "completion": "a", "label": True}, False, "cannot train a paired method"),
    ({"prompt": "p", "completion": "a", "label": "yes"}, True, "'label' must be true or false"),
    ({"prompt": "p", "chosen": user("a"), "rejected": "b"}, False, "must start with an assistant"),
    ({"prompt": [], "chosen": "a", "rejected": "b"}, False, "field 'prompt' must be"),
])
def test_bad_records_are_named(record, unpaired, message):
    with pytest.raises(P.BadRecord, match=message) as e:
        P.parse_preference(record, "data.jsonl:7", unpaired)
    assert str(e.value).startswith("data.jsonl:7: ")


def test_encode_splits_prompt_and_completion(tok):
    prompt, completion = P.encode(user("안녕하세요"), reply("반갑습니다"), tok)
    assert prompt[-1] == tok.special_id("<|assistant|>")
    assert completion[-1] == tok.special_id("<|endofturn|>")
    assert tok.decode(completion[:-1]) == "반갑습니다"


def test_fit_cuts_the_oldest_prompt_tokens_then_completions():
    prompt, c1, c2 = list(range(100, 130)), [1] * 10, [2] * 6
    stats = P.PreferenceStats()
    # room for the prompt = 32 - 10 = 22: its last 22 tokens stay, completions intact
    p, (a, b) = P.fit(prompt, [c1, c2], 32, None, stats)
    assert p == prompt[-22:] and a == c1 and b == c2
    assert (stats.truncated_prompts, stats.truncated_completions) == (1, 0)
    # max_prompt_length applies even when everything fits
    p, _ = P.fit(prompt, [c1, c2], 100, 5, stats)
    assert p == prompt[-5:]
    # a completion too long for a 16-token prompt is cut at its end instead
    p, (a, b) = P.fit(prompt, [[1] * 40, c2], 32, None, stats)
    assert p == prompt[-16:] and a == [1] * 16 and b == c2
    assert stats.truncated_completions == 1


def test_rows_are_slot_major_and_masks_cover_completions():
    exs = [P.PreferenceExample([5, 6], [[7, 8], [9]]), P.PreferenceExample([4], [[3], [2, 1]])]
    rows = P.example_rows(exs)
    assert rows == [([5, 6], [7, 8]), ([4], [3]), ([5, 6], [9]), ([4], [2, 1])]
    b = P.rows_to_batch(rows, seq_length=4, pad=0)
    assert b["tokens"][0].tolist() == [5, 6, 7, 8] and b["labels"][0].tolist() == [6, 7, 8, 0]
    # label j is a completion token: row 0 predicts 7 (j=1) and 8 (j=2)
    assert b["loss_mask"].tolist() == [[0, 1, 1, 0], [1, 0, 0, 0], [0, 1, 0, 0], [1, 1, 0, 0]]
    with pytest.raises(P.PreferenceDataError, match="does not fit"):
        P.rows_to_batch([([1] * 4, [2] * 2)], seq_length=4, pad=0)


def test_sequence_logps_sums_masked_token_losses():
    output = torch.tensor([[0.5, 1.0, 2.0], [0.25, 0.25, 4.0]])  # per-token NLL
    mask = torch.tensor([[0, 1, 1], [1, 0, 0]])
    logps, lengths = sequence_logps(output, mask)
    assert logps.tolist() == [-3.0, -0.25] and lengths.tolist() == [2.0, 1.0]


def test_kto_partners_are_fixed_and_never_oneself():
    exs = [P.PreferenceExample([i], [[10 + i]]) for i in range(7)]
    P.add_kl_completions(exs, length=8, seed=3)
    partners = [ex.completions[1][0] - 10 for ex in exs]
    assert all(p != i for i, p in enumerate(partners))
    assert sorted(partners) == list(range(7))  # every completion used once
    again = [P.PreferenceExample([i], [[10 + i]]) for i in range(7)]
    P.add_kl_completions(again, length=8, seed=3)
    assert [ex.completions for ex in again] == [ex.completions for ex in exs]


def test_unpaired_metrics_are_weighted_by_their_rows():
    counts = metric_counts("kto", torch.tensor([True, True, False]), 3)
    assert counts["rewards/chosen"] == 2 and counts["rewards/rejected"] == 1
    assert counts["rewards/margins"] == 3
    assert metric_counts("kto", torch.tensor([True, True]), 2)["rewards/margins"] == 0
    assert metric_counts("dpo", torch.tensor([True, True]), 2) == {}


def test_udm_weights_follow_the_prompt_classifier():
    # desirable answers come from "ko" prompts, undesirable ones mostly from "en" prompts
    exs = ([P.PreferenceExample([1, 2, 3], [[9]], True) for _ in range(40)]
           + [P.PreferenceExample([1, 2, 3], [[9]], False) for _ in range(10)]
           + [P.PreferenceExample([7, 8, 9], [[9]], False) for _ in range(40)])
    P.fit_udm_weights(exs, dim=64)
    ko_bad = exs[40].udm_weight
    en_bad = exs[60].udm_weight
    assert all(e.udm_weight == 1.0 for e in exs[:40])
    # a prompt typical of desirable feedback weighs more than one that is not
    assert ko_bad > 1.5 and en_bad == pytest.approx(0.5)


def test_read_examples_names_the_line_and_can_skip(tmp_path, tok):
    f = tmp_path / "pref.jsonl"
    f.write_text(json.dumps({"prompt": "a", "chosen": "b", "rejected": "c"}) + "\n"
                 + json.dumps({"prompt": "a", "chosen": "b"}) + "\n")
    with pytest.raises(P.PreferenceDataError, match=r"pref.jsonl:2: .*align.skip_bad"):
        P.read_examples(str(f), tok, "dpo", 64)
    stats = P.PreferenceStats()
    got = P.read_examples(str(f), tok, "kto", 64, skip_bad=True, stats=stats)
    assert len(got) == 2 and [e.desirable for e in got] == [True, False]
    assert stats.bad == {"missing_field": 1}


def test_shared_preference_data_reads(shared_data, tok):
    path = shared_data / "train/preference/ko_hh_rlhf_harmless_base/test.jsonl"
    stats = P.PreferenceStats()
    got = P.read_examples(str(path), tok, "dpo", 257, max_prompt_length=128, stats=stats)
    assert len(got) == stats.records == 1663
    assert all(len(e.prompt) <= 128 and len(e.completions) == 2 for e in got)
    assert all(len(e.prompt) + len(c) <= 257 for e in got for c in e.completions)


# --- the stage on the engine -------------------------------------------------------------


def align_recipe(tmp_path, sft_checkpoint, shared_data, name="run", **align) -> Path:
    pairs = tmp_path / "pairs.jsonl"
    if not pairs.exists():  # a few real pairs of each language
        lines = []
        for src, n in [("en_alpaca_eval_gpt4_judged/train.jsonl", 12),
                       ("ko_hh_rlhf_harmless_base/test.jsonl", 12)]:
            lines += (shared_data / "train/preference" / src).read_text().splitlines()[:n]
        pairs.write_text("\n".join(lines) + "\n")
    return small_recipe(
        tmp_path / f"{name}.yaml", tmp_path / name, tmp_path / "unused",
        data={"tokenizer": {"kind": "sentencepiece", "path": TOKENIZER}, "seq_length": 96,
              "sources": [{"name": "pairs", "path": str(pairs)}]},
        train={"steps": 3, "global_batch_size": 4, "micro_batch_size": 2, "warmup_steps": 0,
               "lr": 1e-3, "min_lr": 1e-3},
        checkpoint={"save_every": 0, "init_from": str(sft_checkpoint)},
        align={"max_prompt_length": 48, **align})


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_dpo_matches_across_tp_pp_and_reference_modes(tmp_path, sft_checkpoint, shared_data):
    recipe = align_recipe(tmp_path, sft_checkpoint, shared_data, method="dpo")
    proc = hcx("align", str(recipe))
    assert "scoring 24 examples with the reference model" in proc.stdout
    single = list(losses(tmp_path / "run").values())
    # step 1: policy = reference, so every pair's loss is log 2; then it learns
    assert single[0] == pytest.approx(0.6931472, abs=1e-6)
    assert len(single) == 3 and single[2] < single[0]
    first = records(tmp_path / "run")[-1]
    for key in ("rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected",
                "logratio"):
        assert key in first
    # the live reference (a second model forward each step) runs under the pipeline schedule
    layouts = {"tp2": ["parallel.tp=2"], "pp2-live": ["parallel.pp=2", "align.reference_logps=live"]}
    for name, overrides in layouts.items():
        out = tmp_path / name
        hcx("align", str(recipe), *overrides, f"output_dir={out}")
        assert list(losses(out).values()) == pytest.approx(single, abs=1e-5), name
    # the stored reference log-probs are reused when the rows and reference are the same
    proc = hcx("align", str(recipe), "train.steps=4")
    assert "reference log-probs from" in proc.stdout and "resumed from" in proc.stdout


@pytest.mark.slow
@pytest.mark.parametrize("method, extra, keys", [
    ("dpo", ["align.label_smoothing=0.2"], ["rewards/margins"]),
    ("ipo", [], ["rewards/margins"]),
    ("kto", ["align.undesirable_weight=1.33"], ["kl", "rewards/chosen", "rewards/rejected"]),
    ("orpo", [], ["nll_loss", "log_odds_ratio"]),
])
def test_each_method_trains(tmp_path, sft_checkpoint, shared_data, method, extra, keys):
    recipe = align_recipe(tmp_path, sft_checkpoint, shared_data, method=method)
    hcx("align", str(recipe), *extra, "train.steps=2")
    got = records(tmp_path / "run")
    assert len(got) == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in got)
    for key in keys:
        assert key in got[-1], key


@pytest.mark.slow
def test_bco_delta_is_checkpointed_and_resumed(tmp_path, sft_checkpoint, shared_data):
    recipe = align_recipe(tmp_path, sft_checkpoint, shared_data, method="bco", bco_udm=True)
    hcx("align", str(recipe), "train.steps=2", "checkpoint.save_every=1")
    meta = json.loads((tmp_path / "run/checkpoints/step_00000002/hcx.json").read_text())
    state = meta["task_state"]["bco_delta"]
    # 2 steps x 4 examples: every reward seen is folded into the running mean
    assert state["count"] == 8
    assert state["mean"] != 0.0 and "delta" in records(tmp_path / "run")[-1]
    proc = hcx("align", str(recipe), "train.steps=3")
    assert "BCO reward shift delta" in proc.stdout and "8 rewards seen" in proc.stdout
    meta = json.loads((tmp_path / "run/checkpoints/step_00000003/hcx.json").read_text())
    assert meta["task_state"]["bco_delta"]["count"] == 12


def test_align_errors_name_the_key(tmp_path, shared_data):
    recipe = align_recipe(tmp_path, tmp_path / "nowhere", shared_data, method="dpo",
                          held_out=0)
    proc = hcx("align", str(recipe), "checkpoint.init_from=null", check=False)
    assert proc.returncode != 0 and "set checkpoint.init_from" in proc.stderr
    proc = hcx("align", str(recipe), "data.eval_every=5", "data.split=98,2,0", check=False)
    assert proc.returncode != 0 and "align.held_out" in proc.stderr
    proc = hcx("align", str(recipe), "align.method=fdpg", "--check", check=False)
    assert proc.returncode != 0 and "align.fdpg" in proc.stderr


@pytest.mark.slow
def test_fdpg_trains_on_policy_and_tp2_matches(tmp_path, sft_checkpoint, shared_data):
    recipe = align_recipe(tmp_path, sft_checkpoint, shared_data, method="fdpg",
                          fdpg={"scorer": "hcx.scorers:has_digit", "max_new_tokens": 8,
                                "divergence": "js"})
    hcx("align", str(recipe), "train.steps=2")
    got = records(tmp_path / "run")
    for key in ("fdpg/divergence", "fdpg/log_z", "fdpg/constraint", "fdpg/distinct_2", "kl",
                "fdpg/baseline", "fdpg/importance_weight"):
        assert key in got[-1], key
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in got)
    # step 1 samples from q = pi, so every importance weight is 1
    assert got[0]["fdpg/importance_weight"] == pytest.approx(1.0, abs=1e-4)
    meta = json.loads((tmp_path / "run/checkpoints/step_00000002/hcx.json").read_text())
    assert meta["task_state"]["partition"]["count"] == 8  # 2 steps x 4 samples
    hcx("align", str(recipe), "train.steps=2", "parallel.tp=2", f"output_dir={tmp_path / 'tp2'}")
    assert list(losses(tmp_path / "tp2").values()) == pytest.approx(
        list(losses(tmp_path / "run").values()), rel=1e-4)


def test_fdpg_scorer_errors_are_named():
    from hcx.stages.align import AlignError
    from hcx.stages.fdpg import load_scorer

    with pytest.raises(AlignError, match="expected 'module:function'"):
        load_scorer("has_digit", None, None, print)
    with pytest.raises(AlignError, match="cannot import it"):
        load_scorer("hcx.scorers:nope", None, None, print)


def test_ready_made_scorers():
    from hcx import scorers

    assert scorers.korean([], ["안녕하세요 hi", "hello 세상"]) == [1.0, 0.0]
    assert scorers.has_digit([], ["a1", "b"]) == [1.0, 0.0]
    assert scorers.korean_share([], ["가a", "123"]) == [0.5, 0.0]
