"""Build hook (all metadata is in pyproject.toml), two things:

- hcx's wheels, editable or not, put ``hcx-lm-eval.pth`` into site-packages, which makes
  ``lm_eval --model hcx`` work from lm-evaluation-harness's own command line (see
  hcx/evaluation/lm_eval/plugin.py: lm-eval 0.4 has no plugin mechanism for models). The
  file is in the wheel's RECORD, so ``pip uninstall`` removes it.
- a (non-editable) wheel carries the repository's top-level ``eval/``, ``tokenizer/`` and
  ``recipes/`` folders as package data under ``hcx/shipped/`` (:data:`SHIPPED`), where
  hcx/resources.py finds them; the repository keeps its layout (an editable install and
  a checkout read the folders where they are).
"""

import ast
import glob
import os
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

PTH_NAME = "hcx-lm-eval.pth"
def _pth_line() -> str:
    """hcx.evaluation.lm_eval.plugin.PTH_LINE, read from the source (the build must not import hcx,
    whose dependencies may not be installed yet): an import hook defined inline, so that
    Python's start-up imports nothing for it."""
    source = Path(__file__).with_name("hcx").joinpath("evaluation", "lm_eval", "plugin.py").read_text("utf-8")
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "PTH_LINE" for t in node.targets):
            return ast.literal_eval(node.value)
    raise RuntimeError("hcx/evaluation/lm_eval/plugin.py defines no PTH_LINE")


PTH_LINE = _pth_line()

# What goes into hcx/shipped/: globs relative to the repository root (hcx.resources.SHIPPED
# names the folders). Listed, not whole folders, so that a checkout's own work (a retrained
# tokenizer/hcx-ko-en-100k/, say) is not packaged by accident.
SHIPPED_DIR = os.path.join("hcx", "shipped")
SHIPPED = (
    "eval/README.md", "eval/tasks/*.yaml", "eval/tasks/_base/*.yaml", "eval/suites/*.yaml",
    "tokenizer/README.md", "tokenizer/*.yaml", "tokenizer/hcx-ko-en-32k/*",
    "recipes/*.yaml", "recipes/pipeline/*.yaml",
)


def shipped_files() -> list[str]:
    """The repository files the wheel ships, relative to the repository root."""
    here = os.path.dirname(os.path.abspath(__file__))
    found = sorted({os.path.relpath(p, here) for pattern in SHIPPED
                    for p in glob.glob(os.path.join(here, pattern)) if os.path.isfile(p)})
    for must in ("eval/tasks", "eval/suites", "tokenizer/hcx-ko-en-32k/tokenizer.model",
                 "recipes/tiny.yaml"):
        if not any(f == must or f.startswith(must + os.sep) for f in found):
            raise RuntimeError(f"building hcx: {must} is missing from the source tree")
    return found


class build_py_with_pth(build_py):
    def run(self):
        super().run()
        if not self.editable_mode:
            here = os.path.dirname(os.path.abspath(__file__))
            for rel in shipped_files():
                dest = os.path.join(self.build_lib, SHIPPED_DIR, rel)
                self.mkpath(os.path.dirname(dest))
                self.copy_file(os.path.join(here, rel), dest)
        if self.editable_mode:
            # `pip install -e .` (PEP 660): build_lib is discarded; setuptools' editable
            # wheel is assembled in install_lib, where data files go too.
            target = self.get_finalized_command("install").install_lib
        else:
            target = self.build_lib
        self.mkpath(target)
        with open(os.path.join(target, PTH_NAME), "w", encoding="utf-8") as f:
            f.write(PTH_LINE)

    def get_outputs(self, include_bytecode=True):
        outputs = list(super().get_outputs(include_bytecode))
        if not self.editable_mode:
            outputs.append(os.path.join(self.build_lib, PTH_NAME))
            outputs += [os.path.join(self.build_lib, SHIPPED_DIR, rel) for rel in shipped_files()]
        return outputs


setup(cmdclass={"build_py": build_py_with_pth})
