"""Fixes for megatron-core 0.16 bugs that are not about CUDA (so not in cpu_compat).

Each fix is narrow, documented, and applied only to the megatron-core versions it
was observed in; a newer megatron-core runs unpatched.

1. Distributed optimizer, torch Adam (no Apex / Transformer Engine), loading the
   'fully_reshardable' format: ``load_parameter_state_from_fully_reshardable``
   leaves torch Adam's per-parameter ``step`` out of the loaded tensors (the step is
   restored from the param groups instead), but ``_set_main_param_and_optimizer_states``
   then copies every key of the destination state, ``step`` included, and raises
   ``KeyError: 'step'``. Here ``step`` is set aside while the other tensors are copied.
2. Same setting, ``DistributedOptimizer.load_state_dict``: the restored ``step`` is
   one tensor object assigned to every parameter's state (``s["step"] = step`` in a
   loop). torch's Adam increments ``state["step"]`` in place once per parameter, so
   after a resume each optimizer step advanced the shared count by the number of
   parameters, and Adam's bias correction went wrong (a resumed run diverged from an
   uninterrupted one from the second step on). Each state gets its own copy.
"""

from __future__ import annotations

_applied = False


def _affected_version() -> bool:
    import megatron.core

    return megatron.core.__version__.startswith("0.16.")


def apply() -> None:
    global _applied
    if _applied or not _affected_version():
        return
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    original = DistributedOptimizer._set_main_param_and_optimizer_states

    def set_states_keeping_step(self, model_param, tensors):
        if "step" in tensors or self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            return original(self, model_param, tensors)
        group_index, group_order = self.model_param_group_index_map[model_param]
        state = self.optimizer.state[self.optimizer.param_groups[group_index]["params"][group_order]]
        step = state.pop("step", None)
        try:
            return original(self, model_param, tensors)
        finally:
            if step is not None:
                state["step"] = step

    DistributedOptimizer._set_main_param_and_optimizer_states = set_states_keeping_step

    original_load = DistributedOptimizer.load_state_dict

    def load_state_dict_unshared_step(self, state_dict):
        original_load(self, state_dict)
        for state in self.optimizer.state.values():
            step = state.get("step")
            if step is not None and hasattr(step, "clone"):
                state["step"] = step.clone()

    DistributedOptimizer.load_state_dict = load_state_dict_unshared_step
    _applied = True
