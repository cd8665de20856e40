"""``hcx plan``'s text: the report :func:`format_plan` prints (``--json`` prints
``Plan.to_dict`` instead)."""

from __future__ import annotations

from hcx.ops.plan.estimate import DEFAULT_MFU, FIT_FRACTION, GIB, Plan
from hcx.ops.plan.memory import state_bytes_per_parameter

def _rows(rows: list[tuple[str, float]]) -> list[str]:
    return [f"  {label:<80}{_n(value):>15}" for label, value in rows]


def _n(x: float) -> str:
    return f"{x:,.0f}"


def _si(x: float, unit: str = "") -> str:
    for scale, prefix in ((1e24, "Y"), (1e21, "Z"), (1e18, "E"), (1e15, "P"), (1e12, "T"),
                          (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.3g} {prefix}{unit}"
    return f"{x:.3g} {unit}"


def _duration(seconds: float) -> str:
    if seconds >= 2 * 86400:
        return f"{seconds / 86400:,.1f} days"
    if seconds >= 2 * 3600:
        return f"{seconds / 3600:.1f} hours"
    return f"{seconds / 60:.1f} minutes"


def _recompute(lo) -> str:
    if lo.recompute != "full":
        return "off" if lo.recompute == "none" else "selective (core attention)"
    method = lo.recompute_method or "uniform"
    n = lo.recompute_num_layers or (1 if method == "uniform" else "all")
    return f"full ({method}, {n} layer{'s' if n != 1 else ''})"


def format_plan(plan: Plan) -> str:
    """The human-readable report."""
    lo, p, g = plan.layout, plan.params, plan.gpu
    out = [
        f"hcx plan: {plan.recipe} on {lo.gpus} x {g.name} ({plan.peak_tflops:g} {lo.precision} "
        f"TFLOP/s peak, {g.memory_gib:g} GiB), MFU {plan.mfu:.0%}"
        + (" (default; --mfu)" if plan.mfu == DEFAULT_MFU else ""),
        f"layout: tp={lo.tp} pp={lo.pp}{f' cp={lo.cp}' if lo.cp > 1 else ''} dp={lo.dp}, "
        "sequence parallel "
        f"{'on' if lo.sequence_parallel else 'off'}, distributed optimizer "
        f"{'on' if lo.distributed_optimizer else 'off'}, recompute {_recompute(lo)}, "
        f"{lo.precision}",
        f"        micro batch {lo.micro_batch} x {lo.seq_length} tokens, global batch "
        f"{lo.global_batch} ({lo.num_microbatches} micro-batch"
        f"{'es' if lo.num_microbatches > 1 else ''} per DP rank per step)",
        "",
        "parameters",
        *_rows([
            (f"embedding ({plan.padded_vocab:,} x {p.embedding // plan.padded_vocab:,}, "
             f"vocabulary {plan.vocab_size:,} padded)", p.embedding),
            (f"{p.num_layers} layers of {_n(p.per_layer)}: attention "
             f"{_n(p.attention_per_layer)}, MLP {_n(p.mlp_per_layer)}, norms "
             f"{_n(p.norms_per_layer)}", p.num_layers * p.per_layer),
            ("final norm", p.final_norm),
            ("output layer" + (" (tied: the embedding)" if p.output_layer == 0 else ""),
             p.output_layer),
            (f"total ({_si(p.total)})", p.total),
        ]),
    ]
    if plan.stages:
        out += _rows([(f"per GPU{f' of stage {st.stage}' if lo.pp > 1 else ''} (tp={lo.tp})",
                        st.params) for st in plan.stages[:4]])
        if lo.pp > 4:
            out += _rows([(f"per GPU of stage {plan.stages[-1].stage}", plan.stages[-1].params)])
    out += [
        "",
        f"FLOPs per token (training)  {_si(plan.flops_per_token, 'FLOP')}"
        f" = 6 x {_si(p.matmul)} matmul weights (layers + output layer)"
        f" + 12 x L x h x s attention ({_si(plan.attention_flops_per_token, 'FLOP')})",
        "  (Narayanan et al. 2021: forward + backward = 3 x forward; recomputation not counted)",
    ]
    if plan.stages:
        out += ["", _memory_table(plan)]
    out += [
        "",
        f"tokens      {_si(plan.tokens)}  ({plan.tokens_from})",
        f"compute     {plan.total_flops:.3g} FLOPs",
        f"time        {_duration(plan.seconds)} on {lo.gpus} GPU{'s' if lo.gpus > 1 else ''} at "
        f"{plan.mfu:.0%} MFU"
        f"  = FLOPs / (GPUs x peak x MFU)",
        f"throughput  {_n(plan.tokens_per_s_per_gpu)} tokens/s per GPU, "
        f"{_n(plan.tokens_per_s_per_gpu * lo.gpus)} tokens/s in all",
        "",
    ]
    if plan.problems:
        out.append("recipe problems (no per-GPU figures until they are fixed):")
        out += [f"  - {x}" for x in plan.problems]
    out += [f"flag: {x}" for x in plan.flags]
    if plan.suggestions:
        out.append("layouts that fit on the same GPUs:")
        out += [f"  - {x}" for x in plan.suggestions]
    out += [f"note: {x}" for x in plan.notes]
    worst = plan.worst
    if worst is not None:
        out.append(f"verdict: {plan.verdict} ({worst.total / GIB:.1f} of {g.memory_gib:g} GiB per "
                   f"GPU{f' on stage {worst.stage}' if lo.pp > 1 else ''}, "
                   f"limit {FIT_FRACTION:.0%}; headroom "
                   f"{g.memory_gib - worst.total / GIB:.1f} GiB)")
    else:
        out.append(f"verdict: {plan.verdict}")
    return "\n".join(out)


def _memory_table(plan: Plan) -> str:
    lo = plan.layout
    shown = plan.stages if lo.pp <= 4 else [plan.stages[0], plan.stages[1], plan.stages[-1]]
    per = state_bytes_per_parameter(lo.precision, lo.distributed_optimizer, lo.dp * lo.cp)
    shards = lo.dp * lo.cp
    shard = (f"/{shards} DP{'xCP' if lo.cp > 1 else ''}" if lo.distributed_optimizer and shards > 1
             else "whole")
    rows = [
        (f"weights ({lo.precision}, {per.weights:g} B/param)", lambda st: st.weights),
        (f"main weights (fp32, {shard})", lambda st: st.main_weights),
        ("gradients (fp32 DDP buffer)", lambda st: st.grads),
        (f"Adam moments (2 x fp32, {shard})", lambda st: st.moments),
        (f"activations (recompute {lo.recompute}{f', cp={lo.cp}' if lo.cp > 1 else ''})",
         lambda st: st.activations),
        ("total", lambda st: st.total),
        ("  activations without recompute", lambda st: st.activations_no_recompute),
        ("  activations, selective recompute", lambda st: st.activations_selective_recompute),
        ("  activations, full recompute", lambda st: st.activations_full_recompute),
        ("  micro-batches in flight (1F1B)", None),
    ]
    head = f"{'memory per GPU (GiB)':<40}" + "".join(
        f"{('stage ' + str(st.stage)) if lo.pp > 1 else 'per GPU':>12}" for st in shown)
    lines = [head]
    for label, get in rows:
        cells = "".join(f"{st.microbatches_in_flight:>12}" if get is None
                        else f"{get(st) / GIB:>12.2f}" for st in shown)
        lines.append(f"  {label:<38}{cells}")
    lines.append(f"  one layer, one micro-batch: {plan.layer_activation_bytes / GIB:.3f} GiB; "
                 f"Korthikanti et al.'s GPT layer of this shape: "
                 f"{plan.korthikanti_layer_bytes / GIB:.3f} GiB without recomputation, "
                 f"{plan.korthikanti_selective_bytes / GIB:.3f} selective, "
                 f"{plan.korthikanti_full_bytes / GIB:.3f} full")
    return "\n".join(lines)
