"""The Python API: docs/api.md's example runs as written, from a directory outside the
checkout, and the API refuses what it cannot do in one process."""

import os
import re
import subprocess
import sys

import pytest

from tests.conftest import ROOT


def api_example() -> str:
    doc = (ROOT / "docs" / "api.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", doc, re.S)
    assert len(blocks) == 1, "docs/api.md should hold exactly one python example"
    return blocks[0]


@pytest.mark.slow
def test_docs_example_runs(tmp_path):
    script = tmp_path / "example.py"
    script.write_text(api_example())
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = proc.stdout.splitlines()
    at = [i for i, line in enumerate(out) if line.startswith("step 2: loss")]
    assert at, out
    lines = out[at[-1]:]  # the example's own prints (the stages log before them)
    assert re.fullmatch(r"step 2: loss \d+\.\d{3}", lines[0]), lines
    assert "'value'" in lines[1] and "'stderr'" in lines[1], lines
    assert lines[2].endswith("report.md") and (tmp_path / lines[2]).is_file()
    assert (tmp_path / "runs/api-demo/eval/scores.json").is_file()


def test_lazy_import_and_version():
    code = ("import sys, hcx; assert 'torch' not in sys.modules; "
            "assert callable(hcx.pretrain) and hcx.__version__; print(hcx.__version__)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        import hcx

        hcx.nope  # noqa: B018


def test_multi_process_layout_refused():
    import hcx
    from hcx.errors import MachineError

    recipe = hcx.load_recipe(ROOT / "recipes" / "tiny.yaml", ["parallel.tp=2"])
    with pytest.raises(MachineError, match="needs 2 processes: run 'hcx pretrain'"):
        hcx.pretrain(recipe)
    with pytest.raises(ValueError, match="overrides apply to a recipe file"):
        hcx.sft(recipe, ["train.steps=1"])
