"""megatron's fused kernels are compiled on first call, not at import (hcx.engine.lazy_fusions)."""

import subprocess
import sys

from hcx.engine.lazy_fusions import deferred
from tests.conftest import ROOT


def test_deferred_compiles_once_on_the_first_call_with_the_options():
    compiled = []

    def compile_fn(fn, **options):
        compiled.append((fn.__name__, options))
        return lambda *a, **k: ("compiled", fn(*a, **k))

    jit = deferred(compile_fn)

    @jit
    def add(a, b=1):
        """Adds."""
        return a + b

    @jit(mode="max-autotune")
    def neg(a):
        return -a

    assert compiled == [] and add.__name__ == "add" and add.__doc__ == "Adds."
    assert add(2, b=3) == ("compiled", 5) and add(1) == ("compiled", 2)
    assert neg(4) == ("compiled", -4)
    assert compiled == [("add", {}), ("neg", {"mode": "max-autotune"})]


def test_importing_megatron_after_hcx_does_not_load_dynamo():
    code = ("import sys, hcx, megatron.core, torch\n"
            "from megatron.core.models.gpt import GPTModel\n"
            "from megatron.core.fusions.fused_bias_swiglu import bias_swiglu\n"
            "jit = sys.modules['megatron.core.jit'].jit_fuser\n"
            "print('torch._dynamo' in sys.modules, jit is torch.compile, jit.__name__)\n")
    out = subprocess.run([sys.executable, "-W", "ignore", "-c", code], cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout.split()
    assert out == ["False", "False", "jit_fuser"]
