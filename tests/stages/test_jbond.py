"""J-BOND (``align.method: jbond``): the shipped recipe and the rules, and the stage end to
end through ``hcx align`` (finite metrics, a moving anchor, an exact resume with the anchor
restored from its checkpoint)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import yaml

from hcx.config import RecipeError, load_recipe
from hcx.stages import stage_for
from tests.conftest import ROOT, hcx
from tests.stages.test_grpo import online_recipe, records

RECIPES = ROOT / "recipes"


def test_shipped_recipe_passes_its_rules():
    recipe = load_recipe(RECIPES / "tiny-jbond.yaml")
    stage = stage_for("align", recipe)
    assert stage.name == "jbond"
    j = stage.resolve(recipe).align.jbond
    assert (j.anchor_samples, j.beta) == (2, 0.5)


def test_rules_name_the_keys():
    recipe = load_recipe(RECIPES / "tiny-jbond.yaml", [
        "parallel.pp=2", "align.online.reward=maths", "align.online.samples_per_prompt=4",
        "align.online.passes=2", "align.jbond.gamma=0.1", "align.jbond.reference_kl=false",
        "checkpoint.init_from=null"])
    with pytest.raises(RecipeError) as e:
        stage_for("align", recipe).resolve(recipe)
    msg = str(e.value)
    assert "parallel.pp: align.method=jbond samples through the generation engine" in msg
    assert "align.online.reward: align.online.reward='maths': not a reward" in msg
    assert "align.online.samples_per_prompt: align.online.samples_per_prompt is a GRPO/RLOO " \
           "setting that align.method=jbond ignores" in msg
    assert "align.online.passes: " in msg
    assert "align.jbond.gamma: align.jbond.gamma > 0 pulls towards the initial model" in msg
    assert "align.reference: " in msg and "align.jbond.reference_kl needs it" in msg
    recipe = load_recipe(RECIPES / "tiny-grpo.yaml", ["align.method=jbond"])
    with pytest.raises(RecipeError, match="align.jbond: align.method=jbond needs align.jbond"):
        stage_for("align", recipe).resolve(recipe)


def jbond_recipe(tmp_path: Path, sft_checkpoint: Path) -> Path:
    """J-BOND on the session's tiny SFT model (the GRPO tests' recipe and prompts, rewarded
    for Korean letters): 4 prompts per step, 8 new tokens, a fast-moving anchor."""
    recipe = online_recipe(tmp_path, sft_checkpoint, max_new_tokens=8)
    data = yaml.safe_load(recipe.read_text())
    online = data["align"]["online"]
    for key in ("samples_per_prompt", "beta"):
        online.pop(key, None)
    data["align"]["method"] = "jbond"
    data["align"]["jbond"] = {"eta": 0.5}
    data["train"].update(steps=4, global_batch_size=4, micro_batch_size=2, lr=3e-3,
                         min_lr=3e-3)
    data["checkpoint"]["save_every"] = 2
    recipe.write_text(yaml.safe_dump(data))
    return recipe


@pytest.fixture(scope="module")
def jbond_run(tmp_path_factory, sft_checkpoint):
    """One uninterrupted 4-step run, checkpoints at steps 2 and 4."""
    tmp = tmp_path_factory.mktemp("jbond")
    recipe = jbond_recipe(tmp, sft_checkpoint)
    hcx("align", str(recipe))
    return {"recipe": recipe, "run": tmp / "run", "records": records(tmp / "run")}


def test_jbond_metrics_are_finite_and_the_anchor_moves(jbond_run):
    got = jbond_run["records"]
    assert [r["step"] for r in got] == [1, 2, 3, 4]
    keys = ("loss", "reward", "reward/anchor", "jbond/reward", "jbond/kl_anchor",
            "jbond/kl_ref", "jbond/quantile", "jbond/log_quantile", "bond/forward_nll",
            "completions/mean_length", "grad_norm")
    for r in got:
        for key in keys:
            assert math.isfinite(r[key]), (r["step"], key, r.get(key))
        assert 0.0 <= r["jbond/quantile"] <= 1.0
    # step 1: policy = anchor = initial model, so both KL estimates are 0 (up to float noise
    # between the training pass and the no-grad scoring pass)
    assert got[0]["jbond/kl_anchor"] == pytest.approx(0.0, abs=1e-4)
    assert got[0]["jbond/kl_ref"] == pytest.approx(0.0, abs=1e-4)
    # later: the policy has moved away from the initial model, and the anchor (halfway
    # between them at eta = 0.5) is neither the policy nor the initial model
    for r in got[1:]:
        assert r["jbond/kl_anchor"] != 0.0 and r["jbond/kl_ref"] != 0.0
        assert r["jbond/kl_anchor"] != pytest.approx(r["jbond/kl_ref"], rel=1e-6)
    meta = json.loads((jbond_run["run"] / "checkpoints/step_00000004/hcx.json").read_text())
    assert meta["task_state"]["anchor"] == {"path": "anchor/step_00000004", "updates": 3}
    anchors = sorted(p.name for p in (jbond_run["run"] / "checkpoints/anchor").iterdir())
    assert anchors == ["step_00000002", "step_00000004"]


def test_jbond_resume_restores_the_anchor_exactly(jbond_run, tmp_path):
    """The run's state after step 2 (its checkpoint and the anchor saved with it), resumed:
    steps 3 and 4 are those of the uninterrupted run. The anchor then differs from the
    policy, so a wrong anchor would change the KL to it and the loss."""
    run = tmp_path / "resumed"
    shutil.copytree(jbond_run["run"] / "checkpoints", run / "checkpoints")
    shutil.rmtree(run / "checkpoints/step_00000004")
    shutil.rmtree(run / "checkpoints/anchor/step_00000004")
    (run / "checkpoints/latest").write_text("step_00000002\n")
    proc = hcx("align", str(jbond_run["recipe"]), f"output_dir={run}")
    assert "at step 2" in proc.stdout
    keys = ("loss", "reward", "reward/anchor", "jbond/kl_anchor", "jbond/kl_ref")
    expected = [[r[k] for k in keys] for r in jbond_run["records"][2:]]
    got = [[r[k] for k in keys] for r in records(run)]
    assert got == expected


@pytest.mark.slow
def test_jbond_tp2_matches_one_process(jbond_run, tmp_path):
    """Two steps at TP=2 (policy, anchor and reference split over two ranks; sampling,
    the anchor's EMA and the rewards identical on both) equal the one-process run's."""
    out = tmp_path / "tp2"
    hcx("align", str(jbond_run["recipe"]), "parallel.tp=2", f"output_dir={out}", "train.steps=2")
    got, ref = records(out), jbond_run["records"][:2]
    for key in ("loss", "reward", "reward/anchor", "jbond/quantile", "completions/mean_length"):
        assert [r[key] for r in got] == pytest.approx([r[key] for r in ref], rel=1e-4,
                                                      abs=1e-6), key
    # KL estimates are differences of nearly equal log-probs: TP's reduction order shows
    for key in ("jbond/kl_anchor", "jbond/kl_ref"):
        assert [r[key] for r in got] == pytest.approx([r[key] for r in ref], abs=1e-5), key
