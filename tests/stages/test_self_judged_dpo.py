"""On-policy self-judged DPO (``align.method: self_judge``): the rules, the pair decisions by
hand (both orders asked, position bias and unreadable verdicts counted), and the stage end
to end through ``hcx align``: a reward-judged run raises the reward, resumes exactly, and
SELF-JUDGE proper (a JSFT model judging its own samples) runs at TP=1 and TP=2 alike."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from hcx.config import RecipeError, load_recipe
from hcx.stages import stage_for
from hcx.stages.self_judged_dpo import PairJudge, reward_points
from tests.conftest import ROOT, SHIPPED_TOKENIZER, hcx, small_recipe
from tests.stages.test_grpo import online_recipe, records

RECIPES = ROOT / "recipes"

# A short pairwise prompt: the 2-layer test model's context holds it (pair-v2's system
# prompt alone is ~200 tokens).
SHORT_PROMPT = [{"name": "short-pair", "type": "pairwise", "system_prompt": "",
                 "prompt_template": "Which answer is better?\nQ: {question}\nA: {answer_a}\n"
                                    "B: {answer_b}\nReply [[A]] or [[B]].",
                 "output_format": "[[A]]"}]


def test_shipped_recipe_passes_its_rules():
    recipe = load_recipe(RECIPES / "tiny-self-judge.yaml")
    stage = stage_for("align", recipe)
    assert stage.name == "self_judge"
    sj = stage.resolve(recipe).align.self_judge
    assert (sj.judge, sj.judge_prompt) == ("self", "pair-v2")


def test_rules_name_the_keys(tmp_path):
    recipe = load_recipe(RECIPES / "tiny-self-judge.yaml", [
        "parallel.pp=2", "align.online.samples_per_prompt=4", "align.online.beta=0.1",
        "checkpoint.init_from=null", "align.self_judge.judge_prompt=single-v1"])
    with pytest.raises(RecipeError) as e:
        stage_for("align", recipe).resolve(recipe)
    msg = str(e.value)
    assert "parallel.pp: align.method=self_judge samples through the " \
           "generation engine" in msg
    assert "align.online.samples_per_prompt: align.online.samples_per_prompt is a GRPO/RLOO " \
           "setting that align.method=self_judge ignores" in msg
    assert "align.online.beta: " in msg and "(DPO's beta is align.beta)" in msg
    assert "align.reference: " in msg and "(DPO's reference model)" in msg
    assert "align.self_judge.judge_prompts: " in msg and "'single-v1' is of type single" in msg
    recipe = load_recipe(RECIPES / "tiny-self-judge.yaml", [
        "align.self_judge.judge=reward", "align.online.reward=null"])
    with pytest.raises(RecipeError, match="align.online.reward: align.method=self_judge needs "
                                          "align.online.reward"):
        stage_for("align", recipe).resolve(recipe)


def test_reward_points_by_hand():
    # pairs: first better, second better, equal, first unreadable
    points = reward_points([0.9, 0.1, 0.2, 0.7, 0.5, 0.5, 0.0, 1.0],
                           [True, True, True, True, True, True, False, True])
    assert points.tolist() == [[2, 0, 0], [0, 2, 0], [0, 0, 0], [0, 0, 2]]


def test_pair_judge_asks_both_orders_and_counts_what_it_cannot_use(tmp_path):
    from hcx.evaluation.judges import load_prompts

    (tmp_path / "judge.yaml").write_text(yaml.safe_dump(SHORT_PROMPT))
    prompt = load_prompts(tmp_path / "judge.yaml")["short-pair"]

    class Scripted:  # replies in turn; the judge asks (a, b) then (b, a) for each pair
        def __init__(self, replies):
            self.replies, self.requests = replies, []

        def generate(self, requests, desc=""):
            self.requests += requests
            return self.replies[:len(requests)]

    model = Scripted(["[[A]]", "[[B]]",      # pair 1: the first wins in both orders
                      "[[B]]", "[[A]]",      # pair 2: the second wins in both orders
                      "[[A]]", "[[A]]",      # pair 3: position bias (inconsistent)
                      "[[A]]", "no idea"])   # pair 4: one order unreadable -> first, 1-0
    judge = PairJudge(model, prompt, 8, collective=False)
    points = judge.points(["q1", "q2", "q3", "q4"], ["a1", "a2", "a3", "a4"],
                          ["b1", "b2", "b3", "b4"])
    assert points.tolist() == [[2, 0, 0], [0, 2, 0], [1, 1, 0], [1, 0, 1]]
    shown = [r.prompt[-1]["content"] for r in model.requests[:2]]
    assert "A: a1\nB: b1" in shown[0] and "A: b1\nB: a1" in shown[1]


def test_step_statistics_by_hand():
    from hcx.stages.self_judged_dpo import SelfJudgeTask

    nan = float("nan")
    # [points first, points second, unreadable, decided, first won, unfinished, r1, r2]
    rows = torch.tensor([[2, 0, 0, 1, 1, 0.0, 0.5, 0.1],
                         [1, 1, 0, 0, 0, 1.0, 0.2, 0.2],
                         [0, 0, 2, 0, 0, 0.5, nan, 0.3],
                         [0, 2, 0, 1, 0, 0.0, 0.4, 0.0]], dtype=torch.float64)
    stat = SelfJudgeTask.step_stats(rows).__getitem__
    assert stat("judge/decided") == 0.5 and stat("judge/undecided") == 0.5
    assert stat("judge/inconsistent") == 0.25
    assert stat("judge/unparsed") == 2 / 8
    assert stat("judge/first") == 0.5
    assert stat("completions/clipped_ratio") == pytest.approx(1.5 / 4)
    assert stat("reward") == pytest.approx((0.5 + 0.1 + 0.2 + 0.2 + 0.3 + 0.4 + 0.0) / 7)


# --- end to end --------------------------------------------------------------------------


def self_judge_recipe(tmp_path: Path, init: Path, name: str, prompts: Path, **self_judge) -> Path:
    """self_judge on ``prompts``, 8 pairs per step, rewarded (reported or deciding) by the
    share of Korean letters (hcx.scorers:korean_share)."""
    recipe = online_recipe(tmp_path, init, name=name, prompts_field="prompt")
    data = yaml.safe_load(recipe.read_text())
    data["data"]["sources"][0]["path"] = str(prompts)
    for key in ("samples_per_prompt", "beta"):
        data["align"]["online"].pop(key)
    data["align"].update(method="self_judge", beta=0.1, self_judge=self_judge)
    data["train"].update(global_batch_size=8, micro_batch_size=4, lr=1e-3, min_lr=1e-3)
    recipe.write_text(yaml.safe_dump(data))
    return recipe


@pytest.fixture(scope="module")
def reward_judged(tmp_path_factory, sft_checkpoint):
    """12 steps on two fixed prompts sampled at temperature 0.05 (as the GRPO test), the
    pairs decided by the reward; checkpoints every 6 steps."""
    tmp = tmp_path_factory.mktemp("self_judge_reward")
    prompts = tmp / "prompts.jsonl"
    prompts.write_text('{"prompt": "Write one sentence about the sea."}\n'
                       '{"prompt": "Name a colour."}\n')
    recipe = self_judge_recipe(tmp, sft_checkpoint, "run", prompts, judge="reward")
    hcx("align", str(recipe), "align.online.temperature=0.05", "checkpoint.save_every=6")
    return {"recipe": recipe, "run": tmp / "run", "records": records(tmp / "run")}


@pytest.mark.slow
def test_reward_judged_dpo_raises_the_reward(reward_judged):
    got = reward_judged["records"]
    assert [r["step"] for r in got] == list(range(1, 13))
    for key in ("loss", "kl", "reward", "judge/decided", "judge/first", "rewards/margins",
                "completions/clipped_ratio"):
        assert all(math.isfinite(r[key]) for r in got), key
    assert got[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # policy = reference at step 1
    assert got[0]["loss"] == pytest.approx(math.log(2) * got[0]["judge/decided"], abs=1e-5)
    assert all(r["judge/unparsed"] == 0.0 and r["judge/inconsistent"] == 0.0 for r in got)
    # 16 samples per step; each step's mean reward against the first, over the last three
    # steps (their standard error from the per-sample rewards is at most 0.5 / 4 each)
    first = got[0]["reward"]
    late = sum(r["reward"] for r in got[-3:]) / 3
    assert late - first > math.hypot(0.125, 0.125 / math.sqrt(3)), [r["reward"] for r in got]
    assert got[-1]["kl"] > 0


@pytest.mark.slow
def test_resume_is_exact(reward_judged, tmp_path):
    run = tmp_path / "resumed"
    shutil.copytree(reward_judged["run"] / "checkpoints", run / "checkpoints")
    shutil.rmtree(run / "checkpoints/step_00000012")
    (run / "checkpoints/latest").write_text("step_00000006\n")
    proc = hcx("align", str(reward_judged["recipe"]), f"output_dir={run}",
               "align.online.temperature=0.05", "checkpoint.save_every=6", "train.steps=9")
    assert "at step 6" in proc.stdout
    keys = ("loss", "reward", "kl", "judge/decided")
    assert [[r[k] for k in keys] for r in records(run)] == \
           [[r[k] for k in keys] for r in reward_judged["records"][6:9]]


@pytest.fixture(scope="module")
def jsft_model(tmp_path_factory, sft_checkpoint):
    """The session's SFT model after JSFT (``hcx data jsft`` + ``hcx sft``) on 32 pairs
    whose Korean answer beats the English one, judged with a short prompt: a model that
    writes verdicts ([[A]] / [[B]]), whatever their worth at this size."""
    tmp = tmp_path_factory.mktemp("jsft")
    questions = ["Name a colour.", "Say hello.", "Name an animal.", "Name a city."]
    korean = ["빨간색입니다.", "안녕하세요.", "고양이입니다.", "서울입니다."]
    english = ["Red.", "Hello.", "A cat.", "Seoul."]
    with open(tmp / "prefs.jsonl", "w", encoding="utf-8") as f:
        for i in range(32):
            f.write(json.dumps({"prompt": [{"role": "user", "content": questions[i % 4]}],
                                "chosen": [{"role": "assistant", "content": korean[i * 3 % 4]}],
                                "rejected": [{"role": "assistant", "content": english[i % 4]}]},
                               ensure_ascii=False) + "\n")
    (tmp / "judge.yaml").write_text(yaml.safe_dump(SHORT_PROMPT))
    (tmp / "prompts.jsonl").write_text("".join(json.dumps({"prompt": q}) + "\n"
                                               for q in questions))
    hcx("data", "jsft", str(tmp / "prefs.jsonl"), "--judge-prompts", str(tmp / "judge.yaml"),
        "--judge-prompt", "short-pair", "--out", str(tmp / "jsft.jsonl"))
    recipe = small_recipe(
        tmp / "jsft.yaml", tmp / "jsft", tmp / "unused",
        data={"tokenizer": {"kind": "sentencepiece", "path": SHIPPED_TOKENIZER},
              "seq_length": 96, "sources": [{"name": "jsft", "path": str(tmp / "jsft.jsonl")}]},
        train={"steps": 30, "global_batch_size": 8, "micro_batch_size": 4, "warmup_steps": 0,
               "lr": 3e-3, "min_lr": 3e-3, "decay_style": "constant"},
        checkpoint={"save_every": 0, "init_from": str(sft_checkpoint)}, sft={"packing": False})
    hcx("sft", str(recipe))
    return {"checkpoints": tmp / "jsft" / "checkpoints", "dir": tmp}


@pytest.mark.slow
def test_self_judgment_at_tp1_and_tp2(jsft_model, tmp_path):
    """SELF-JUDGE proper: the JSFT model samples pairs and judges them with its current
    weights (every verdict readable: JSFT taught the format); TP=2 gives the same steps."""
    d = jsft_model["dir"]
    recipe = self_judge_recipe(tmp_path, jsft_model["checkpoints"], "self", d / "prompts.jsonl",
                               judge="self", judge_prompts=str(d / "judge.yaml"),
                               judge_prompt="short-pair", judge_max_new_tokens=8)
    hcx("align", str(recipe), "train.steps=2")
    one = records(tmp_path / "self")
    assert [r["step"] for r in one] == [1, 2]
    assert all(r["judge/unparsed"] == 0.0 for r in one), one
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["kl"]) for r in one)
    hcx("align", str(recipe), "train.steps=2", "parallel.tp=2", f"output_dir={tmp_path / 'tp2'}")
    two = records(tmp_path / "tp2")
    for key in ("loss", "reward", "judge/decided", "judge/inconsistent", "judge/first"):
        assert [r[key] for r in two] == pytest.approx([r[key] for r in one], rel=1e-4,
                                                      abs=1e-6), key
    # kl is a difference of nearly equal log-probs: TP's reduction order shows at 1e-6
    assert [r["kl"] for r in two] == pytest.approx([r["kl"] for r in one], abs=1e-5)
