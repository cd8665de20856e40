"""GRPO and RLOO (``align.method: grpo | rloo``): reward specs, the verifiable rewards on
hand-made samples, and the stage end to end through ``hcx align`` (the reward rises, TP=2
matches one process, a killed run resumes exactly)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from hcx.config import load_recipe
from hcx.stages import stage_for
from hcx.stages.rewards import (CodeReward, MathReward, RewardError, Sample, code_program,
                                load_reward, math_correct, parse_spec)
from tests.conftest import ROOT, SHIPPED_TOKENIZER, hcx, losses, small_recipe

RECIPES = ROOT / "recipes"


# --- reward specs ------------------------------------------------------------------------


@pytest.mark.parametrize("spec, kind, arg", [
    ("math", "math", ""), ("code", "code", ""),
    ("judge:self", "judge", "self"), ("judge:http://127.0.0.1:8000/v1", "judge",
                                      "http://127.0.0.1:8000/v1"),
    ("judge:/ckpt/step_00000010", "judge", "/ckpt/step_00000010"),
    ("reward-model:runs/rm/checkpoints", "reward-model", "runs/rm/checkpoints"),
    ("hcx.scorers:korean_share", "function", "hcx.scorers:korean_share"),
])
def test_reward_specs_parse(spec, kind, arg):
    parsed = parse_spec(spec)
    assert (parsed.kind, parsed.arg) == (kind, arg)


@pytest.mark.parametrize("spec, why", [
    ("", "empty"), ("maths", "not a reward"), ("judge:", "judge: needs a model"),
    ("reward-model:", "needs the reward model"), ("hcx.scorers:", "is not 'module:function'"),
    ("not a module:f", "is not 'module:function'"),
])
def test_bad_reward_specs_name_the_key(spec, why):
    with pytest.raises(RewardError, match=why) as e:
        parse_spec(spec, "align.online.reward")
    assert str(e.value).startswith(f"align.online.reward={spec!r}: ")
    assert "math, code, judge:MODEL, reward-model:PATH, module:function" in str(e.value)


def test_function_rewards_load_and_bad_ones_are_named():
    cfg = load_recipe(RECIPES / "tiny-grpo.yaml").align.online
    reward = load_reward("hcx.scorers:korean_share", cfg)
    assert reward([Sample("hi", "가a"), Sample([{"role": "user", "content": "x"}], "123")]) \
        == [0.5, 0.0]
    with pytest.raises(RewardError, match=r"align.online.reward='hcx.scorers:nope': cannot "
                                          "import it"):
        load_reward("hcx.scorers:nope", cfg)
    with pytest.raises(RewardError, match="align.online.judge_prompts: .*no judge prompt "
                                          "'nope'"):
        load_reward("judge:self", cfg.model_copy(update={"judge_prompt": "nope"}))


def test_math_reward_on_hand_made_samples():
    assert math_correct("so 48 + 24 = 72.\n#### 72", "... #### 72") == 1.0
    assert math_correct("#### 1,000", "#### 1000") == 1.0  # lm-eval's normalisation
    assert math_correct("It is 3, then 72.0", "72") == 1.0  # the last number, as a number
    assert math_correct("#### 71 (or 72)", "#### 72") == 0.0  # '#### N' wins over the last
    assert math_correct("no idea", "#### 72") == 0.0
    reward = MathReward("answer")
    gsm = {"answer": "Natalia sold 48/2 = 24 clips in May.\n#### 72"}
    assert reward([Sample("q", "The answer is 72", gsm), Sample("q", "#### 24", gsm)]) == [1, 0]
    with pytest.raises(RewardError, match="no 'answer' field"):
        reward([Sample("q", "72", {})])


def test_math_answer_from_chat_data():
    from hcx.stages.prompts import split_answer

    messages = [{"role": "user", "content": "2 + 2?"}, {"role": "assistant", "content": "#### 4"}]
    prompt, record = split_answer(messages, {"messages": messages}, "answer")
    assert prompt == messages[:1] and record["answer"] == "#### 4"
    assert split_answer("2 + 2?", {"answer": "4"}, "answer") == ("2 + 2?", {"answer": "4"})


def test_code_reward_on_hand_made_samples():
    mbpp = {"test_list": ["assert add(1, 2) == 3", "assert add(-1, 1) == 0"]}
    good = "Here it is:\n```python\ndef add(a, b):\n    return a + b\n```\nDone."
    bad = "def add(a, b):\n    return a - b"
    assert code_program(good, mbpp, "test_list").startswith("def add(a, b):\n    return a + b\n")
    humaneval = {"test": "def check(f):\n    assert f(2) == 4\n", "entry_point": "double"}
    program = code_program("def double(x):\n    return 2 * x", humaneval, "test")
    assert program.rstrip().endswith("check(double)")
    reward = CodeReward("test_list", timeout_s=2, workers=2)
    assert reward([Sample("q", good, mbpp), Sample("q", bad, mbpp),
                   Sample("q", "while True: pass", mbpp)]) == [1.0, 0.0, 0.0]
    assert CodeReward("test")([Sample("q", "def double(x):\n    return 2 * x", humaneval)]) == [1.0]
    with pytest.raises(RewardError, match="no 'test' field"):
        CodeReward("test")([Sample("q", "x = 1", {})])


# --- recipes and rules -------------------------------------------------------------------


@pytest.mark.parametrize("name, method", [("tiny-grpo.yaml", "grpo"), ("tiny-rloo.yaml", "rloo")])
def test_shipped_recipes_pass_their_rules(name, method):
    recipe = load_recipe(RECIPES / name)
    stage = stage_for("align", recipe)
    assert stage.name == method
    stage.resolve(recipe)


def test_rules_name_the_keys():
    from hcx.config import RecipeError

    recipe = load_recipe(RECIPES / "tiny-grpo.yaml", [
        "parallel.pp=2", "align.online.samples_per_prompt=3", "align.online.reward=maths",
        "align.online.epsilon_high=0.1", "align.online.beta=0.1", "checkpoint.init_from=null"])
    with pytest.raises(RecipeError) as e:
        stage_for("align", recipe).resolve(recipe)
    msg = str(e.value)
    assert "parallel.pp: align.method=grpo samples through the generation engine" in msg
    assert "train.global_batch_size: train.global_batch_size=16 must be a multiple of " \
           "align.online.samples_per_prompt * parallel.dp = 3 * 1" in msg
    assert "align.online.reward: align.online.reward='maths': not a reward" in msg
    assert "align.online.epsilon_high: align.online.epsilon_high=0.1 is below" in msg
    assert "align.reference: " in msg and "align.online.beta > 0 needs it" in msg
    recipe = load_recipe(RECIPES / "tiny-dpo.yaml", ["align.method=rloo"])
    with pytest.raises(RecipeError, match="align.online: align.method=rloo needs align.online"):
        stage_for("align", recipe).resolve(recipe)


# --- end to end --------------------------------------------------------------------------


def online_recipe(tmp_path: Path, sft_checkpoint: Path, name: str = "run", **online) -> Path:
    """GRPO on the session's tiny SFT model: English prompts, rewarded for Korean letters
    (hcx.scorers:korean_share), 4 completions of 2 prompts per step."""
    return small_recipe(
        tmp_path / f"{name}.yaml", tmp_path / name, tmp_path / "unused",
        data={"tokenizer": {"kind": "sentencepiece", "path": SHIPPED_TOKENIZER},
              "seq_length": 64,
              "sources": [{"name": "en", "path": "data://train/sft/en_alpaca_seed_tasks/train.jsonl"}]},
        train={"steps": 12, "global_batch_size": 8, "micro_batch_size": 4, "warmup_steps": 0,
               "lr": 3e-3, "min_lr": 3e-3, "decay_style": "constant"},
        checkpoint={"save_every": 0, "init_from": str(sft_checkpoint)},
        align={"method": "grpo", "max_prompt_length": 32,
               "online": {"reward": "hcx.scorers:korean_share", "samples_per_prompt": 4,
                          "max_new_tokens": 12, "prompts_field": "messages", "beta": 0.04,
                          **online}})


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def grpo_run(tmp_path_factory, sft_checkpoint):
    """An uninterrupted GRPO run (12 steps, checkpoints every 3) on two fixed prompts:
    sampled at temperature 0.05, where the near-random tiny model's choices per context
    are few enough for a dozen steps to move the reward."""
    tmp = tmp_path_factory.mktemp("grpo")
    prompts = tmp / "prompts.jsonl"
    prompts.write_text('{"prompt": "Write one sentence about the sea."}\n'
                       '{"prompt": "Name a colour."}\n')
    recipe = online_recipe(tmp, sft_checkpoint, temperature=0.05, prompts_field="prompt",
                           passes=2)
    text = recipe.read_text().replace(
        "data://train/sft/en_alpaca_seed_tasks/train.jsonl", str(prompts))
    recipe.write_text(text)
    hcx("align", str(recipe), "train.global_batch_size=16", "train.lr=1e-3",
        "train.min_lr=1e-3", "checkpoint.save_every=3")
    return {"recipe": recipe, "run": tmp / "run", "records": records(tmp / "run")}


@pytest.mark.slow
def test_grpo_raises_a_verifiable_reward(grpo_run):
    got = grpo_run["records"]
    assert [r["step"] for r in got] == list(range(1, 13))
    for key in ("reward", "reward/std", "reward/unparsed", "kl", "clip_ratio/region_mean",
                "completions/mean_length", "frac_reward_zero_std", "completions/clipped_ratio"):
        assert key in got[-1], key
    assert got[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # policy = reference at step 1
    assert all(math.isfinite(r["kl"]) and math.isfinite(r["loss"]) for r in got)
    assert all(r["reward/unparsed"] == 0.0 for r in got)
    # passes=2: the second step reuses the rollout (same rewards) with a moved policy,
    # whose ratios to the rollout policy now leave the clip range
    assert got[0]["clip_ratio/region_mean"] == 0.0 and got[0]["reward"] == got[1]["reward"]
    assert got[1]["clip_ratio/region_mean"] > 0
    # One rollout per two steps (16 completions: a mean's standard error is std / 4);
    # the last two rollouts against the first.
    rollouts = got[::2]
    first, last = rollouts[0], rollouts[-2:]
    late = sum(r["reward"] for r in last) / 2
    late_se = math.sqrt(sum((r["reward/std"] / 4) ** 2 for r in last)) / 2
    assert late - first["reward"] > math.hypot(first["reward/std"] / 4, late_se), rollouts


@pytest.mark.slow
def test_grpo_sigkill_then_resume_is_exact(grpo_run, tmp_path):
    """Killed after step 4 (checkpoint of step 3, in the middle of a rollout's two
    passes: the rollout is in the checkpoint), the same command resumes and reproduces
    every step of the uninterrupted run exactly (6 of its 12 steps: the learning rate is
    constant, so a shorter run is the same run)."""
    from tests.engine.test_engine import run_and_kill_after

    run = tmp_path / "killed"
    args = [str(grpo_run["recipe"]), f"output_dir={run}", "train.global_batch_size=16",
            "train.lr=1e-3", "train.min_lr=1e-3", "checkpoint.save_every=3", "train.steps=6"]
    run_and_kill_after(args, run, kill_after_step=4, command="align")
    assert max(losses(run)) < 6, "killed too late to test anything"
    meta = json.loads((run / "checkpoints/step_00000003/hcx.json").read_text())
    assert meta["task_state"]["rollout"]["parts"][0]["number"] == 1  # steps 3 and 4's
    proc = hcx("align", *args)
    assert "resumed from" in proc.stdout and "at step 3" in proc.stdout
    expected = {r["step"]: (r["loss"], r["reward"], r["kl"]) for r in grpo_run["records"][:6]}
    got = {r["step"]: (r["loss"], r["reward"], r["kl"]) for r in records(run)}
    assert got == expected


@pytest.mark.slow
def test_grpo_tp2_matches_one_process(grpo_run, tmp_path):
    out = tmp_path / "tp2"
    hcx("align", str(grpo_run["recipe"]), "parallel.tp=2", f"output_dir={out}", "train.steps=2",
        "train.global_batch_size=16", "train.lr=1e-3", "train.min_lr=1e-3")
    got, ref = records(out), grpo_run["records"][:2]
    for key in ("loss", "reward", "kl", "completions/mean_length"):
        assert [r[key] for r in got] == pytest.approx([r[key] for r in ref], rel=1e-4, abs=1e-6), key


def test_judge_reward_scales_ratings_and_counts_unparsed():
    from hcx.evaluation.judges import Judge, load_prompts
    from hcx.paths import resolve
    from hcx.stages.rewards import JudgeReward, rewards_on_tp

    class Scripted:  # answers each judge request in turn
        def __init__(self, replies):
            self.replies, self.requests = replies, []

        def generate(self, requests, desc=""):
            self.requests += requests
            return self.replies[:len(requests)]

    prompts = load_prompts(resolve("data://eval/mt_bench_en/judge_prompts.jsonl"))
    model = Scripted(["Good. Rating: [[10]]", "Meh [[4]]", "no rating here"])
    reward = JudgeReward(Judge(model, prompts, 64), "judge:scripted", collective=False)
    chat = [{"role": "user", "content": "earlier"}, {"role": "assistant", "content": "x"},
            {"role": "user", "content": "What is 2+2?"}]
    samples = [Sample("Say hi", "Hi!"), Sample(chat, "4"), Sample("q", "a")]
    assert reward(samples) == [1.0, pytest.approx(3 / 9), None]
    user = model.requests[1].prompt[-1]["content"]
    assert "What is 2+2?" in user and "earlier" not in user  # the last user turn is graded
    model.requests.clear()
    assert rewards_on_tp(reward, samples) == ([1.0, pytest.approx(3 / 9), 0.0],
                                              [True, True, False])


def test_samples_without_a_verdict_get_advantage_zero():
    """A None reward takes its group's mean parsed reward: advantage 0, the group's mean
    unchanged; a group without any verdict teaches nothing. Reported: the raw mean over
    parsed samples and the unparsed fraction."""
    from types import SimpleNamespace

    from hcx.stages.grpo import OnlineTask
    from hcx.stages.rollouts import Rollout

    cfg = load_recipe(RECIPES / "tiny-grpo.yaml", ["align.online.samples_per_prompt=3"]).align.online
    task = OnlineTask.__new__(OnlineTask)
    task.cfg, task.method, task.normalizer = cfg, "grpo", None
    task.engine = SimpleNamespace(topo=SimpleNamespace(dp=1, dp_rank=0))
    rollout = Rollout(0, [[1]] * 6, [[5, 6], [5], [7, 8, 9]] * 2,
                      [1.0, 0.0, 0.0, 0.0, 0.0, 0.0], [True, True, False, False, False, False],
                      [], [True] * 6)
    task._advantages(rollout)
    assert rollout.rewards[:3] == [1.0, 0.0, 0.5]
    a = rollout.advantages
    assert a[2] == 0.0 and a[0] == pytest.approx(-a[1]) and a[0] > 0
    assert a[3:] == [0.0, 0.0, 0.0]
    assert rollout.stats["reward"] == 0.5 and rollout.stats["reward/unparsed"] == pytest.approx(4 / 6)
    assert rollout.stats["mean_tokens"] == 2.0


@pytest.mark.slow
def test_rloo_trains_with_its_leave_one_out_baseline(grpo_run, tmp_path):
    """align.method: rloo on the same task (2 steps, one pass per rollout): the same first
    rollout as GRPO's (seeded sampling from the same policy), a per-sequence loss, KL 0 at
    step 1 and every metric finite."""
    out = tmp_path / "rloo"
    hcx("align", str(grpo_run["recipe"]), "align.method=rloo", "align.online.passes=1",
        "align.online.epsilon_high=null", f"output_dir={out}", "train.steps=2",
        "train.global_batch_size=16", "train.lr=1e-3", "train.min_lr=1e-3")
    got = records(out)
    assert [r["step"] for r in got] == [1, 2]
    assert got[0]["reward"] == grpo_run["records"][0]["reward"]  # the same first rollout
    assert got[0]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert all(math.isfinite(v) for r in got for v in r.values() if isinstance(v, float))
