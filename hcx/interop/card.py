"""The model card (README.md) ``hcx export`` writes beside the weights: Hugging Face's
YAML metadata block (with ``model-index`` scores from an ``hcx eval`` run directory),
then what the model is, the recipe it was trained with and a summary of its data."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from hcx.config import Recipe
from hcx.errors import HcxError


class CardError(HcxError, ValueError):
    pass


def read_scores(run_dir: Path) -> dict:
    """``scores.json`` of an ``hcx eval`` run directory (``--eval RUN_DIR``)."""
    path = Path(run_dir) / "scores.json"
    try:
        scores = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CardError(f"--eval {run_dir}: not an 'hcx eval' run directory (cannot read "
                        f"{path}: {e})") from None
    if not isinstance(scores.get("tasks"), dict):
        raise CardError(f"--eval {run_dir}: {path} has no tasks")
    return scores


def model_index(name: str, scores: dict) -> list[dict]:
    """Hugging Face's ``model-index``: one result per task, every metric with a value."""
    results = []
    for task, entry in sorted(scores["tasks"].items()):
        metrics = [{"type": metric, "name": metric, "value": round(float(m["value"]), 6)}
                   for metric, m in entry.get("metrics", {}).items()
                   if isinstance(m, dict) and isinstance(m.get("value"), (int, float))]
        if metrics:
            results.append({"task": {"type": "text-generation"},
                            "dataset": {"name": task, "type": task},
                            "metrics": metrics})
    return [{"name": name, "results": results}]


def _languages(recipe: Recipe) -> list[str]:
    found = {s.language for s in recipe.data.sources if s.language in ("ko", "en")}
    return sorted(found) or ["ko", "en"]


def model_card(recipe: Recipe, ckpt: Path, config: dict, scores: dict | None) -> str:
    meta = json.loads((Path(ckpt) / "hcx.json").read_text()) if (Path(ckpt) / "hcx.json").is_file() else {}
    front: dict = {"library_name": "transformers", "pipeline_tag": "text-generation",
                   "language": _languages(recipe), "tags": ["hcx", "megatron-core"]}
    if scores:
        front["model-index"] = model_index(recipe.name, scores)
    m, t, d = recipe.model, recipe.train, recipe.data
    step = meta.get("step")
    tokens = (step or 0) * t.global_batch_size * d.seq_length
    imported = meta.get("imported_from")
    lines = [
        "---", yaml.safe_dump(front, sort_keys=False, allow_unicode=True).rstrip(), "---", "",
        f"# {recipe.name}", "",
        f"A {config['architectures'][0]} model exported by `hcx export` from the checkpoint "
        f"`{Path(ckpt).name}`" + (f" (step {step})" if step is not None else "") + ".", "",
        "## Model", "",
        "| key | value |", "|---|---|",
        *[f"| {k} | {v} |" for k, v in [
            ("family", m.family), ("layers", m.num_layers), ("hidden size", m.hidden_size),
            ("FFN size", m.ffn_hidden_size), ("attention heads", m.num_attention_heads),
            ("key/value groups", m.query_groups), ("head size", m.kv_channels),
            ("vocabulary", config.get("vocab_size")),
            ("context", m.max_position_embeddings), ("RoPE base", m.rope_base),
            ("RoPE scaling", m.rope_scaling.model_dump() if m.rope_scaling else "none"),
            ("QKV biases", m.qkv_bias), ("QK-norm", m.qk_norm),
            ("tied embeddings", m.tie_embeddings)]],
        "",
        "## Training", "",
    ]
    if imported:
        lines += [f"Initialized from `{imported.get('hf_dir')}` "
                  f"({imported.get('model_type')}) by `hcx import`.", ""]
    elif recipe.checkpoint.init_from:
        lines += [f"Initialized from `{recipe.checkpoint.init_from}`.", ""]
    lines += [
        f"{step if step is not None else '?'} steps of {t.global_batch_size} sequences of "
        f"{d.seq_length} tokens (about {tokens:,} tokens), peak learning rate {t.lr:g} "
        f"({t.decay_style} decay to {t.min_lr:g}, {t.warmup_steps} warmup steps).", "",
        "### Data", "",
        "| source | language | weight | location |", "|---|---|---|---|",
        *[f"| {s.name} | {s.language} | {s.weight:g} | `{s.path or s.prefix}` |"
          for s in d.sources],
        "", f"Tokenizer: {d.tokenizer.kind}.", "",
    ]
    if scores:
        lines += ["## Evaluation", "", f"From `hcx eval` ({scores.get('created', '')}):", "",
                  "| task | metric | value |", "|---|---|---|"]
        for task, entry in sorted(scores["tasks"].items()):
            primary = entry.get("primary")
            value = entry.get("metrics", {}).get(primary, {}).get("value")
            lines.append(f"| {task} | {primary} | "
                         f"{'n/a' if value is None else format(value, '.4f')} |")
        lines.append("")
    lines += ["## Recipe", "", "```yaml",
              yaml.safe_dump(recipe.to_dict(), sort_keys=False, allow_unicode=True).rstrip(),
              "```", ""]
    return "\n".join(lines)
