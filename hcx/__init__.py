"""hcx: Korean-English bilingual LLMs on megatron-core.

The Python API (see docs/api.md), importable from here without loading torch until a
function is called::

    import hcx

    recipe = hcx.load_recipe("recipes/tiny.yaml", ["train.steps=20"])
    hcx.pretrain(recipe)
    scores = hcx.evaluate("runs/tiny/checkpoints", ["quick"], "runs/eval/tiny")
    hcx.report(["runs/eval/tiny"], "runs/eval/tiny/report")

The package layout: :mod:`hcx.engine` (model, parallelism, loop, checkpoints, generation),
:mod:`hcx.tokenizer`, :mod:`hcx.data` (sources, preparation, tokenizer training),
:mod:`hcx.stages` (pretraining, SFT, alignment), :mod:`hcx.evaluation`, :mod:`hcx.interop`
(Hugging Face), :mod:`hcx.ops` (pipelines, cluster launch, planning) and
:mod:`hcx.commands` (the command line).
"""

from importlib import metadata as _metadata

from hcx.engine import lazy_fusions as _lazy_fusions

_lazy_fusions.install()  # megatron's unused fused kernels: no torch.compile at import

try:
    __version__ = _metadata.version("hcx")
except _metadata.PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"

API = ("load_recipe", "pretrain", "sft", "align", "train", "evaluate", "report")
__all__ = ["__version__", *API]


def __getattr__(name: str):
    # Lazily: `import hcx` (lm-eval's start-up hook imports hcx.evaluation.lm_eval) must
    # not import torch or megatron.
    if name in API:
        from hcx import api

        return getattr(api, name)
    raise AttributeError(f"module 'hcx' has no attribute {name!r}")
