"""The training stages, each a :class:`hcx.engine.stage.Stage` on the shared engine.

======================  ==========================  =================================
command                 stage                       module
======================  ==========================  =================================
``hcx pretrain``        next-token prediction       :mod:`hcx.stages.pretrain`
``hcx sft``             chat fine-tuning            :mod:`hcx.stages.sft`
``hcx align`` (dpo, ipo, kto, bco, orpo)  preference losses  :mod:`hcx.stages.align`
``hcx align`` (reward)  Bradley-Terry reward model  :mod:`hcx.stages.reward`
``hcx align`` (fdpg)    f-DPG, on-policy            :mod:`hcx.stages.fdpg`
``hcx align`` (grpo, rloo)  GRPO / RLOO, on-policy  :mod:`hcx.stages.grpo`
``hcx align`` (jbond)   J-BOND, on-policy           :mod:`hcx.stages.jbond`
``hcx align`` (self_judge)  self-judged DPO, on-policy  :mod:`hcx.stages.self_judged_dpo`
======================  ==========================  =================================

:func:`stage_for` picks the stage of a command and recipe; ``hcx align`` picks by
``align.method``. Modules are imported only when their stage is asked for.
"""

from __future__ import annotations

import importlib

from hcx.config import AlignConfig, Recipe

COMMANDS = ("pretrain", "sft", "align")

# align.method -> the stage that trains it
ALIGN_METHODS = {"dpo": "hcx.stages.align:AlignStage", "ipo": "hcx.stages.align:AlignStage",
                 "kto": "hcx.stages.align:AlignStage", "bco": "hcx.stages.align:AlignStage",
                 "orpo": "hcx.stages.align:AlignStage",
                 "reward": "hcx.stages.reward:RewardStage", "fdpg": "hcx.stages.fdpg:FDPGStage",
                 "grpo": "hcx.stages.grpo:GRPOStage", "rloo": "hcx.stages.grpo:RLOOStage",
                 "jbond": "hcx.stages.jbond:JBondStage",
                 "self_judge": "hcx.stages.self_judged_dpo:SelfJudgeStage"}
STAGES = {"pretrain": "hcx.stages.pretrain:PretrainStage", "sft": "hcx.stages.sft:SFTStage"}


def stage_for(command: str, recipe: Recipe):
    """The :class:`~hcx.engine.stage.Stage` that ``hcx COMMAND`` runs ``recipe`` with."""
    if command == "align":
        target = ALIGN_METHODS[(recipe.align or AlignConfig()).method]
    elif command in STAGES:
        target = STAGES[command]
    else:
        raise ValueError(f"no training stage {command!r}; stages: {', '.join(COMMANDS)}")
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)()
