"""The stage mechanism: a command and align.method pick the stage, each stage's rules are
checked by --check before any process starts (naming file:line), and a stage's recipe holds
only its own section."""

import typing

import pytest
import yaml

from hcx.config import AlignConfig, RecipeError, load_recipe
from hcx.stages import ALIGN_METHODS, stage_for
from tests.conftest import ROOT, hcx

RECIPES = ROOT / "recipes"


def test_every_align_method_has_a_stage():
    methods = typing.get_args(AlignConfig.model_fields["method"].annotation)
    assert sorted(methods) == sorted(ALIGN_METHODS)
    names = {m: stage_for("align", load_recipe(RECIPES / "tiny-dpo.yaml", [f"align.method={m}",
                                                 "align.fdpg.scorer=hcx.scorers:has_digit",
                                                 "align.online.reward=math"])).name
             for m in methods}
    assert names == {"dpo": "align", "ipo": "align", "kto": "align", "bco": "align",
                     "orpo": "align", "reward": "reward", "fdpg": "fdpg",
                     "grpo": "grpo", "rloo": "rloo", "jbond": "jbond",
                     "self_judge": "self_judge"}
    assert stage_for("pretrain", load_recipe(RECIPES / "tiny.yaml")).name == "pretrain"
    with pytest.raises(ValueError, match="no training stage 'eval'"):
        stage_for("eval", load_recipe(RECIPES / "tiny.yaml"))


@pytest.mark.parametrize("command,path", [
    ("pretrain", "tiny.yaml"), ("sft", "tiny-sft.yaml"), ("align", "tiny-dpo.yaml"),
    ("align", "tiny-ipo.yaml"), ("align", "tiny-kto.yaml"), ("align", "tiny-bco.yaml"),
    ("align", "tiny-orpo.yaml"), ("align", "tiny-reward.yaml"), ("align", "tiny-fdpg.yaml"),
    ("align", "tiny-grpo.yaml"), ("align", "tiny-rloo.yaml"), ("align", "tiny-jbond.yaml")])
def test_shipped_recipes_pass_their_stage(command, path):
    recipe = load_recipe(RECIPES / path)
    resolved = stage_for(command, recipe).resolve(recipe)
    section = {"pretrain": None, "sft": "sft", "align": "align"}[command]
    kept = {s for s in ("sft", "align") if getattr(resolved, s) is not None}
    assert kept == ({section} if section else set())
    assert set(resolved.to_dict()) & {"sft", "align"} == kept


def test_stage_rules_name_the_key_and_its_line(tmp_path):
    path = tmp_path / "bad-sft.yaml"
    path.write_text(yaml.safe_dump({"base": str(RECIPES / "tiny-sft.yaml"), "data": {"eval_every": 5}}))
    recipe = load_recipe(path)  # the shared rules pass
    with pytest.raises(RecipeError, match=rf"{path}:\d+: data.eval_every: hcx sft has no "
                                          "validation pass"):
        stage_for("sft", recipe).resolve(recipe)
    recipe = load_recipe(RECIPES / "tiny-fdpg.yaml", ["parallel.pp=2", "align.fdpg.samples_per_prompt=3"])
    with pytest.raises(RecipeError) as e:
        stage_for("align", recipe).resolve(recipe)
    msg = str(e.value)
    assert "override 'parallel.pp=2': parallel.pp: align.method=fdpg samples through" in msg
    assert "align.fdpg.samples_per_prompt=3 must divide train.micro_batch_size" in msg
    recipe = load_recipe(RECIPES / "tiny-dpo.yaml", ["checkpoint.init_from=null"])
    with pytest.raises(RecipeError, match="align.reference: align.method=dpo compares against a "
                                          "reference model"):
        stage_for("align", recipe).resolve(recipe)
    stage_for("align", load_recipe(RECIPES / "tiny-orpo.yaml", ["checkpoint.init_from=null"]))


def test_check_applies_the_stage_rules_before_any_process(tmp_path):
    bad = hcx("align", str(RECIPES / "tiny-dpo.yaml"), "align.held_out=0", "--check", check=False)
    assert bad.returncode == 2
    assert "data.eval_every: data.eval_every needs held-out examples" in bad.stderr
    assert "tiny-dpo.yaml:" in bad.stderr  # where data.eval_every was set
    ok = hcx("align", str(RECIPES / "tiny-reward.yaml"), "--check")
    assert "reward stage" in ok.stdout
    shown = hcx("recipe", str(RECIPES / "tiny-dpo.yaml"), "--stage", "align").stdout
    assert "align:" in shown and "\nsft:" not in shown
    assert "\nsft:" in hcx("recipe", str(RECIPES / "tiny-dpo.yaml")).stdout
