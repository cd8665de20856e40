"""``hcx pretrain``, ``hcx sft``, ``hcx align``: the training stages; ``hcx recipe``."""

from __future__ import annotations

import argparse

from hcx.commands.common import OVERRIDES_HELP, needs_relaunch, relaunch_with_torchrun
from hcx.config import load_recipe


def run_training_command(command: str, args: argparse.Namespace, argv: list[str]) -> int:
    """Validate the recipe and its stage's rules (before any process starts), start the
    processes the layout needs, run the stage."""
    from hcx.engine.stage import run_stage
    from hcx.stages import stage_for

    recipe = load_recipe(args.recipe, args.overrides)
    stage = stage_for(command, recipe)
    recipe = stage.resolve(recipe)
    if args.check:
        print(f"{args.recipe}: ok ({recipe.parallel.world_size} processes, "
              f"{recipe.num_microbatches} micro-batches per step; {stage.name} stage)")
        return 0
    if needs_relaunch(recipe.parallel.world_size):
        return relaunch_with_torchrun(recipe.parallel.world_size, argv)
    run_stage(stage, recipe)
    return 0


def cmd_recipe(args: argparse.Namespace, argv: list[str]) -> int:
    import yaml

    recipe = load_recipe(args.recipe, args.overrides)
    if args.stage:
        from hcx.stages import stage_for

        recipe = stage_for(args.stage, recipe).resolve(recipe)
    print(yaml.safe_dump(recipe.to_dict(), sort_keys=False, allow_unicode=True), end="")
    return 0


STAGE_COMMANDS = {
    "pretrain": dict(
        example="recipes/tiny.yaml",
        help="pretrain a decoder with megatron-core (TP/PP/DP)",
        description="Pretrain on megatron indexed datasets. Processes: parallel.tp * "
                    "parallel.pp * parallel.dp; when more than one is needed and hcx is not "
                    "already under torchrun, it starts them itself on this machine. Resumes "
                    "from the newest complete checkpoint in checkpoint.dir unless "
                    "checkpoint.resume=false."),
    "sft": dict(
        example="recipes/tiny-sft.yaml",
        help="supervised fine-tuning on chat conversations (same engine and layouts)",
        description="Fine-tune on conversations (data.sources: JSONL/Parquet/hf:// with a "
                    "'messages' list of {role, content}) rendered with the hcx chat "
                    "template; the loss is on assistant tokens only. sft.packing (default "
                    "true) puts several conversations in a sequence with attention isolated "
                    "between them. Start from pretrained weights with checkpoint.init_from. "
                    "Processes, resume and checkpoints as for pretrain."),
    "align": dict(
        example="recipes/tiny-dpo.yaml",
        help="preference alignment: DPO, IPO, KTO, BCO, ORPO, f-DPG, reward models",
        description="Align a fine-tuned model with align.method: dpo (align.label_smoothing "
                    "> 0 = conservative DPO), ipo, kto, bco, orpo (no reference model), "
                    "reward (a Bradley-Terry reward model) or fdpg (f-DPG towards a target "
                    "defined by a constraint or reward scorer). data.sources hold preference "
                    "records: prompt + chosen + rejected, or prompt + completion + label. "
                    "The reference model is checkpoint.init_from unless align.reference is "
                    "set; its log-probs are precomputed once (align.reference_logps="
                    "precomputed) or computed live. See docs/alignment.md."),
}


def add_parsers(sub) -> None:
    for name, text in STAGE_COMMANDS.items():
        p = sub.add_parser(name, help=text["help"], description=text["description"])
        p.add_argument("recipe", help=f"recipe YAML, e.g. {text['example']}")
        p.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
        p.add_argument("--check", action="store_true",
                       help="validate the recipe, with this stage's rules, and exit")
        p.set_defaults(func=lambda args, argv, command=name:
                       run_training_command(command, args, argv))

    p = sub.add_parser("recipe", help="print a recipe after inheritance and overrides",
                       description="Validate a recipe and print it fully resolved.")
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    p.add_argument("--stage", choices=["pretrain", "sft", "align"],
                   help="print it as this stage runs it: its own section only, its rules "
                        "checked")
    p.set_defaults(func=cmd_recipe)
