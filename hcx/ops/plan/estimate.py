"""The plan: FLOPs, time to train and memory of every pipeline stage for a model and
layout (:func:`estimate`), whether it fits, what to change when it does not
(:func:`suggest_layouts`), and the same from a recipe file (:func:`plan_recipe`)."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from hcx.config import ModelConfig, Recipe, load_config
from hcx.errors import HcxError
from hcx.ops.plan.layout import (GpuSpec, Layout, PlanError, gpu_spec, layout_from_recipe,
                                 layout_problems)
from hcx.ops.plan.memory import (ParamCounts, StageEstimate, estimate_stage,
                                 korthikanti_layer_bytes, layer_activation_bytes,
                                 parameter_counts)

GIB = 2**30
FIT_FRACTION = 0.9  # a layout fits when its estimate is at most 90% of the GPU's memory
DEFAULT_MFU = 0.40

EXIT_FITS = 0
EXIT_INVALID = 2  # the recipe or layout is invalid (as for every recipe error)
EXIT_DOES_NOT_FIT = 3


@dataclass
class Plan:
    """Everything ``hcx plan`` reports (``to_dict`` for ``--json``)."""

    recipe: str
    gpu: GpuSpec
    layout: Layout
    mfu: float
    vocab_size: int
    padded_vocab: int
    params: ParamCounts
    stages: list[StageEstimate]
    flops_per_token: float
    attention_flops_per_token: float
    tokens: int
    tokens_from: str
    layer_activation_bytes: float  # one layer, one micro-batch, no recomputation
    korthikanti_layer_bytes: float  # the same for their GPT layer of this shape
    korthikanti_selective_bytes: float  # ... without the attention scores
    korthikanti_full_bytes: float = 0.0  # ... its input only (full recomputation)
    problems: list[str] = field(default_factory=list)  # the recipe/layout is invalid
    flags: list[str] = field(default_factory=list)  # warnings
    suggestions: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def peak_tflops(self) -> float:
        return self.gpu.peak_tflops(self.layout.precision)

    @property
    def total_flops(self) -> float:
        return self.flops_per_token * self.tokens

    @property
    def seconds(self) -> float:
        """Time to train: total FLOPs / (GPUs x peak x MFU)."""
        return self.total_flops / (self.layout.gpus * self.peak_tflops * 1e12 * self.mfu)

    @property
    def tokens_per_s_per_gpu(self) -> float:
        return self.peak_tflops * 1e12 * self.mfu / self.flops_per_token

    @property
    def worst(self) -> StageEstimate | None:
        return max(self.stages, key=lambda st: st.total) if self.stages else None

    @property
    def limit_bytes(self) -> float:
        return FIT_FRACTION * self.gpu.memory_gib * GIB

    @property
    def verdict(self) -> str:
        if self.problems:
            return "invalid layout"
        return "fits" if self.worst.total <= self.limit_bytes else "does not fit"

    @property
    def exit_code(self) -> int:
        return {"fits": EXIT_FITS, "does not fit": EXIT_DOES_NOT_FIT}.get(self.verdict,
                                                                          EXIT_INVALID)

    def to_dict(self) -> dict[str, Any]:
        worst = self.worst
        gib = lambda x: round(x / GIB, 3)  # noqa: E731
        return {
            "recipe": self.recipe,
            "verdict": self.verdict,
            "gpu": asdict(self.gpu) | {"peak_tflops_used": self.peak_tflops},
            "gpus": self.layout.gpus,
            "layout": asdict(self.layout) | {"num_microbatches": self.layout.num_microbatches},
            "mfu": self.mfu,
            "vocab_size": self.vocab_size,
            "padded_vocab_size": self.padded_vocab,
            "parameters": asdict(self.params) | {"per_layer": self.params.per_layer,
                                                 "matmul": self.params.matmul},
            "parameters_per_gpu": max((st.params for st in self.stages), default=None),
            "flops_per_token": self.flops_per_token,
            "attention_flops_per_token": self.attention_flops_per_token,
            "tokens": self.tokens,
            "tokens_from": self.tokens_from,
            "total_flops": self.total_flops,
            "time_to_train_s": self.seconds,
            "time_to_train_days": self.seconds / 86400,
            "tokens_per_s_per_gpu": self.tokens_per_s_per_gpu,
            "tokens_per_s": self.tokens_per_s_per_gpu * self.layout.gpus,
            "memory_limit_gib": gib(self.limit_bytes),
            "memory_per_gpu_gib": None if worst is None else gib(worst.total),
            "headroom_gib": None if worst is None else gib(self.gpu.memory_gib * GIB - worst.total),
            "layer_activation_gib": gib(self.layer_activation_bytes),
            "korthikanti_layer_gib": gib(self.korthikanti_layer_bytes),
            "korthikanti_selective_layer_gib": gib(self.korthikanti_selective_bytes),
            "korthikanti_full_layer_gib": gib(self.korthikanti_full_bytes),
            "stages": [_stage_dict(st) for st in self.stages],
            "problems": self.problems,
            "flags": self.flags,
            "suggestions": self.suggestions,
            "notes": self.notes,
        }


def _stage_dict(st: StageEstimate) -> dict[str, Any]:
    counts = ("stage", "layers", "params", "microbatches_in_flight")
    d = asdict(st) | {"total": st.total}
    return {(k if k in counts else f"{k}_gib"): (v if k in counts else round(v / GIB, 3))
            for k, v in d.items()}


def estimate(model: ModelConfig, layout: Layout, vocab_size: int, gpu: GpuSpec,
             mfu: float = DEFAULT_MFU, tokens: int | None = None, recipe_name: str = "",
             steps: int | None = None, problems: list[str] | None = None) -> Plan:
    """The plan for a model and layout; ``problems`` (from the recipe checks) leave the
    per-GPU figures out. ``tokens`` defaults to ``steps * global_batch * seq_length``."""
    from hcx.engine.metrics import training_flops_per_token
    from hcx.engine.model import padded_vocab_size

    if not 0 < mfu <= 1:
        raise PlanError(f"--mfu must be in (0, 1], got {mfu}")
    padded = padded_vocab_size(vocab_size, layout.tp)
    counts = parameter_counts(model, padded)
    problems = list(problems or [])
    stages = [] if problems else [estimate_stage(model, counts, padded, layout, i)
                                  for i in range(layout.pp)]
    s = layout.seq_length
    if tokens is None:
        if steps is None:
            raise PlanError("give tokens or steps")
        tokens, tokens_from = steps * layout.global_batch * s, \
            f"train.steps x global batch x seq_length = {steps} x {layout.global_batch} x {s}"
    else:
        tokens_from = "--tokens"
    plan = Plan(
        recipe=recipe_name, gpu=gpu, layout=layout, mfu=mfu, vocab_size=vocab_size,
        padded_vocab=padded, params=counts, stages=stages,
        flops_per_token=training_flops_per_token(model, padded, s),
        attention_flops_per_token=12.0 * model.num_layers * model.hidden_size * s,
        tokens=tokens, tokens_from=tokens_from,
        layer_activation_bytes=layer_activation_bytes(model, layout),
        # Their layer at this shape, per GPU: a CP rank holds 1/cp of the tokens (and of
        # the score matrix's rows).
        **{key: korthikanti_layer_bytes(
            s, layout.micro_batch, model.hidden_size, model.num_attention_heads, layout.tp,
            layout.sequence_parallel, **kw) / layout.cp
           for key, kw in (("korthikanti_layer_bytes", {}),
                           ("korthikanti_selective_bytes", {"selective": True}),
                           ("korthikanti_full_bytes", {"full": True}))},
        problems=problems,
    )
    _annotate(plan, model)
    return plan


def _annotate(plan: Plan, model: ModelConfig) -> None:
    """Flags, suggestions and notes."""
    lo = plan.layout
    if lo.layer_impl == "fused":
        plan.notes.append("activations counted for Transformer Engine's fused layers "
                          "(model.transformer_impl=auto on a GPU with TE); "
                          "model.transformer_impl=local counts megatron's local layers, "
                          "which keep more")
    if lo.recompute == "full":
        plan.notes.append("train.recompute=full: the backward pass runs each layer's "
                          "forward again (about 4/3 of the compute), so expect a lower "
                          "MFU for the same hardware utilization")
    elif lo.recompute == "selective":
        plan.notes.append("train.recompute=selective recomputes core attention only "
                          "(Korthikanti et al.): it saves the attention scores of unfused "
                          "attention, but fused attention (TE, SDPA) never stores them, so "
                          "here it saves only the softmax statistics")
    if lo.cp > 1:
        plan.notes.append(f"parallel.cp={lo.cp}: each GPU holds {lo.local_seq_length} of the "
                          f"{lo.seq_length} tokens of a sequence (activations / cp) and the "
                          f"distributed optimizer shards over dp x cp = {lo.dp * lo.cp}; "
                          "K and V travel around the CP ring in every attention layer")
    if plan.problems:
        return
    if lo.tp > 1 and not lo.sequence_parallel:
        plan.flags.append(f"parallel.tp={lo.tp} without parallel.sequence_parallel: the "
                          "norms' activations are replicated on every TP rank")
    if lo.pp > 1:
        bubble = (lo.pp - 1) / lo.num_microbatches
        if bubble > 0.25:
            plan.flags.append(
                f"pipeline bubble (pp-1)/m = {lo.pp - 1}/{lo.num_microbatches} = "
                f"{bubble:.0%} of a step (Narayanan et al.): raise the global batch or "
                "lower the micro batch, or the stated MFU is out of reach")
    if lo.tp > 8:
        plan.flags.append(f"parallel.tp={lo.tp} spans more than one 8-GPU node: TP traffic "
                          "would cross the network")
    if plan.verdict == "does not fit":
        worst = plan.worst
        comps = worst.components()
        top = max(comps, key=comps.get)
        plan.flags.append(
            f"does not fit: stage {worst.stage} needs {worst.total / GIB:.1f} GiB per GPU, "
            f"over {FIT_FRACTION:.0%} of {plan.gpu.memory_gib:g} GiB; the largest part is "
            f"{top} ({comps[top] / GIB:.1f} GiB)")
        plan.suggestions.extend(suggest_layouts(model, lo, plan.vocab_size, plan.gpu))


def suggest_layouts(model: ModelConfig, layout: Layout, vocab_size: int, gpu: GpuSpec,
                    limit: int = 3) -> list[str]:
    """The smallest changes, on the same number of GPUs, that fit: first one setting
    at a time (recomputation, sequence parallelism, a smaller micro batch, the
    distributed optimizer), then layouts with more TP (up to 8, one node), PP or CP
    (context parallelism, with Transformer Engine's layers), least model parallelism and
    no recomputation first."""
    from hcx.engine.model import padded_vocab_size

    n = layout.gpus
    single: list[tuple[str, Layout]] = []
    if layout.recompute != "full":
        single.append(("train.recompute=full", layout.replace(recompute="full")))
    if layout.tp > 1 and not layout.sequence_parallel:
        single.append(("parallel.sequence_parallel=true",
                       layout.replace(sequence_parallel=True)))
    if layout.micro_batch > 1:
        single.append(("train.micro_batch_size=1", layout.replace(micro_batch=1)))
    if not layout.distributed_optimizer and layout.dp > 1:
        single.append(("parallel.distributed_optimizer=true",
                       layout.replace(distributed_optimizer=True)))
    grid: list[tuple[tuple, str, Layout]] = []
    cps = (1, 2, 4, 8) if layout.layer_impl == "fused" else (1,)  # CP needs TE attention
    for tp in (1, 2, 4, 8):
        for pp in [p for p in range(1, model.num_layers + 1) if model.num_layers % p == 0]:
            for cp in cps:
                mp = tp * pp * cp
                if n % mp or (tp, pp, cp) == (layout.tp, layout.pp, layout.cp):
                    continue
                for recompute in ("none", "full"):
                    for mb in sorted({layout.micro_batch, 1}, reverse=True):
                        cand = layout.replace(tp=tp, pp=pp, cp=cp, dp=n // mp,
                                              sequence_parallel=tp > 1, recompute=recompute,
                                              micro_batch=mb)
                        keys = [f"parallel.tp={tp}", f"parallel.pp={pp}"]
                        if cp != layout.cp:
                            keys.append(f"parallel.cp={cp}")
                        keys.append(f"parallel.dp={n // mp}")
                        if tp > 1:
                            keys.append("parallel.sequence_parallel=true")
                        if recompute != layout.recompute:
                            keys.append(f"train.recompute={recompute}")
                        if mb != layout.micro_batch:
                            keys.append(f"train.micro_batch_size={mb}")
                        grid.append(((mp, recompute == "full", -mb, pp, cp), " ".join(keys),
                                     cand))
    out = []
    for text, cand in single + [(t, c) for _, t, c in sorted(grid, key=lambda x: x[0])]:
        if layout_problems(model, cand):
            continue
        padded = padded_vocab_size(vocab_size, cand.tp)
        counts = parameter_counts(model, padded)
        need = max(estimate_stage(model, counts, padded, cand, i).total for i in range(cand.pp))
        if need <= FIT_FRACTION * gpu.memory_gib * GIB:
            out.append(f"{text}: {need / GIB:.1f} GiB per GPU")
            if len(out) >= limit:
                break
    if not out:
        out.append(f"no layout of {n} GPUs up to tp=8 fits: use more GPUs or GPUs with more memory")
    return out


# --- from a recipe file ----------------------------------------------------------


def parse_tokens(text: str) -> int:
    """``300B``, ``1.5T``, ``2e12`` or ``123456`` -> a token count."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([kKmMbBtT]?)\s*", text)
    if not m:
        raise PlanError(f"--tokens {text!r}: expected a number, optionally with K, M, B or T "
                        "(e.g. 300B, 1.5T)")
    scale = {"": 1, "k": 1e3, "m": 1e6, "b": 1e9, "t": 1e12}[m.group(2).lower()]
    value = int(float(m.group(1)) * scale)
    if value <= 0:
        raise PlanError(f"--tokens {text!r} must be positive")
    return value


def recipe_vocab_size(recipe: Recipe) -> int:
    """``model.vocab_size``, else the tokenizer's vocabulary (as ``hcx pretrain``)."""
    if recipe.model.vocab_size is not None:
        return recipe.model.vocab_size
    from hcx.tokenizer.loading import load_tokenizer

    try:
        return load_tokenizer(recipe.data.tokenizer).vocab_size
    except (HcxError, OSError) as e:
        raise PlanError(f"cannot read the vocabulary size from data.tokenizer ({e}); set "
                        "model.vocab_size=N to plan without the tokenizer") from None


def plan_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = (),
                gpus: int | None = None, gpu: GpuSpec | None = None, mfu: float = DEFAULT_MFU,
                tokens: int | None = None) -> Plan:
    """Load a recipe (``--gpus N`` sets ``parallel.dp = N / (tp * pp * cp)``) and plan it.
    Invalid combinations (heads or groups not divisible by TP, layers by PP, batch by
    micro batch x DP, ...) become ``Plan.problems`` with the recipe's own messages."""
    from hcx.config import layout_errors, origin_of

    from hcx.resources import recipe_path

    overrides = list(overrides)
    recipe, _ = load_config(recipe_path(path), Recipe, overrides)
    notes = []
    if gpus is not None:
        if gpus <= 0:
            raise PlanError(f"--gpus must be positive, got {gpus}")
        p = recipe.parallel
        mp = p.tp * p.pp * p.cp
        if gpus % mp:
            raise PlanError(f"--gpus {gpus} is not divisible by parallel.tp * parallel.pp * "
                            f"parallel.cp = {p.tp} * {p.pp} * {p.cp} = {mp}")
        if gpus // mp != recipe.parallel.dp:
            notes.append(f"parallel.dp={gpus // mp} (from --gpus {gpus}; the recipe has "
                         f"{recipe.parallel.dp})")
            overrides.append(f"parallel.dp={gpus // mp}")
    recipe, origins = load_config(path, Recipe, overrides)
    problems = [f"{origin_of(key, origins, str(path))}: {msg}"
                for key, msg in layout_errors(recipe)]
    plan = estimate(recipe.model, layout_from_recipe(recipe), recipe_vocab_size(recipe),
                    gpu or gpu_spec("h100"), mfu, tokens, recipe.name, recipe.train.steps,
                    problems)
    plan.notes[:0] = notes
    return plan
