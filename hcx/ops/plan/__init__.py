"""``hcx plan``: what a recipe costs on N GPUs, before any GPU is asked for.

Parameters (total, per GPU, per pipeline stage), training FLOPs per token, memory per
GPU (weights, gradients, optimizer state, activations with and without recomputation)
and the time to train at an assumed MFU; layouts that do not fit are flagged with the
component that dominates and the smallest layouts that would fit.

Sources of the formulas (each function's docstring gives its own):

- FLOPs: Narayanan et al. 2021, "Efficient Large-Scale Language Model Training on GPU
  Clusters Using Megatron-LM" (SC'21), Appendix: training = 3 x forward,
  ``6 * N_matmul + 12 * L * h * s`` per token (``hcx.engine.metrics.training_flops_per_token``,
  the same figure the engine's logged MFU uses).
- Weights, gradients, optimizer: Megatron-LM's distributed-optimizer note
  (docs/source/api-guide/dist_optimizer.md): bf16 parameters with fp32 gradients cost
  ``6 + 12/d`` bytes per parameter with the distributed optimizer (``18`` without),
  fp32 ``8 + 8/d`` (``16``), d = data-parallel size. hcx's DDP reduces gradients in
  fp32 (``hcx/engine/optim.py``: ``grad_reduce_in_fp32=True``).
- Activations: Korthikanti et al. 2022, "Reducing Activation Recomputation in Large
  Transformer Models" (arXiv 2205.05198), Sec. 4: ``s*b*h*(34 + 5*a*s/h)`` bytes per
  layer, divided by t with tensor + sequence parallelism; full recomputation keeps
  ``2*s*b*h`` per layer; 1F1B keeps ``p`` micro-batches in flight on the first stage.
  hcx's layer is not their GPT layer (SwiGLU, GQA, no dropout, fused attention), so
  the same accounting is redone for it (:func:`fused_layer_activation_bytes`, which
  gives their 34 + 5as/h back for their layer) and for megatron's local layers
  (:func:`local_layer_activation_bytes`, measured exactly on CPU in tests/ops/test_plan.py).

The modules: ``layout`` (GPUs, the layout of a step, its rules), ``memory`` (parameters,
state and activation bytes, one stage's memory), ``estimate`` (the :class:`Plan`, its
verdict and suggestions, planning a recipe file) and ``format`` (the text ``hcx plan``
prints). Every public name is importable from ``hcx.ops.plan``.
"""

from hcx.ops.plan.estimate import (DEFAULT_MFU, EXIT_DOES_NOT_FIT, EXIT_FITS, EXIT_INVALID,
                                   FIT_FRACTION, GIB, Plan, estimate, parse_tokens,
                                   plan_recipe, recipe_vocab_size, suggest_layouts)
from hcx.ops.plan.format import format_plan
from hcx.ops.plan.layout import (GpuSpec, LayerImpl, Layout, PlanError, gpu_spec,
                                 layout_from_recipe, layout_problems)
from hcx.ops.plan.memory import (ParamCounts, StageEstimate, StateBytes, estimate_stage,
                                 fused_layer_activation_bytes, input_activation_bytes,
                                 korthikanti_layer_bytes, layer_activation_bytes,
                                 layer_input_bytes, local_layer_activation_bytes,
                                 microbatches_in_flight, output_activation_bytes,
                                 parameter_counts, stage_activation_bytes, stage_parameters,
                                 state_bytes_per_parameter)

__all__ = [
    # layout
    "GpuSpec", "LayerImpl", "Layout", "PlanError", "gpu_spec", "layout_from_recipe",
    "layout_problems",
    # memory
    "ParamCounts", "StageEstimate", "StateBytes", "estimate_stage",
    "fused_layer_activation_bytes", "input_activation_bytes", "korthikanti_layer_bytes",
    "layer_activation_bytes", "layer_input_bytes", "local_layer_activation_bytes",
    "microbatches_in_flight", "output_activation_bytes", "parameter_counts",
    "stage_activation_bytes", "stage_parameters", "state_bytes_per_parameter",
    # estimate
    "DEFAULT_MFU", "EXIT_DOES_NOT_FIT", "EXIT_FITS", "EXIT_INVALID", "FIT_FRACTION", "GIB",
    "Plan", "estimate", "parse_tokens", "plan_recipe", "recipe_vocab_size", "suggest_layouts",
    # format
    "format_plan",
]
