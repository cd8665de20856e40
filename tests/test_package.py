"""hcx as an installed package, and runs that carry what they need.

- The wheel (built from a copy of the source tree, as ``pip install .`` builds it) holds
  the benchmark tasks and suites, the shipped tokenizer and the recipes, and an hcx
  installed from it works from a directory outside the checkout: ``--version``, ``eval
  --list``, ``recipe tiny.yaml``.
- The core install leaves evaluation's dependencies out (``hcx[eval]``); a command that
  needs a missing one says which extra installs it.
- A run whose recipe names its inputs relatively, trained from another directory, then
  moved, still opens from a third directory (generate, export): its checkpoints carry
  their tokenizer.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT, TINY

SHIPPED = "hcx/shipped/"


def run(*args: str, cwd: Path, pythonpath: Path, timeout: int = 300,
        check: bool = True) -> subprocess.CompletedProcess:
    """``python ARGS`` with only ``pythonpath`` in front of the environment's packages."""
    env = {**os.environ, "PYTHONPATH": str(pythonpath), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"python {' '.join(args)} exited {proc.returncode}\n--- stdout\n"
                             f"{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-4000:]}")
    return proc


def repo_files(pattern: str) -> set[str]:
    return {str(p.relative_to(ROOT)) for p in ROOT.glob(pattern) if p.is_file()}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """``pip wheel .`` of a copy of the source tree (the build writes build/ and
    *.egg-info beside the sources; the checkout stays as it is)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "shipped")
    src.mkdir()
    for name in ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for name in ("hcx", "eval", "tokenizer", "recipes"):
        shutil.copytree(ROOT / name, src / name, ignore=ignore)
    dist = tmp / "dist"
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                           "--no-index", "-q", "-w", str(dist), str(src)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    [built] = dist.glob("hcx-*.whl")
    return built


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Path:
    """The wheel installed into a folder of its own (``pip install --target``; its
    dependencies are the environment's)."""
    site = tmp_path_factory.mktemp("site")
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index",
                           "-q", "--target", str(site), str(wheel)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return site


def test_the_wheel_carries_tasks_tokenizer_and_recipes(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {n[len(SHIPPED):] for n in names if n.startswith(SHIPPED)}
    for pattern in ("eval/tasks/*.yaml", "eval/tasks/_base/*.yaml", "eval/suites/*.yaml",
                    "tokenizer/hcx-ko-en-32k/*", "tokenizer/*.yaml", "recipes/*.yaml",
                    "recipes/pipeline/*.yaml"):
        want = repo_files(pattern)
        assert want and want <= shipped, (pattern, sorted(want - shipped))
    assert "tokenizer/hcx-ko-en-32k/tokenizer.model" in shipped
    assert "hcx-lm-eval.pth" in names  # lm_eval --model hcx (setup.py)
    assert "hcx/evaluation/templates/report.html.j2" in names  # the report page
    assert "hcx/resources.py" in names and not any("__pycache__" in n for n in names)


def test_the_core_install_leaves_evaluation_dependencies_to_the_eval_extra(wheel):
    [meta] = [n for n in zipfile.ZipFile(wheel).namelist() if n.endswith(".dist-info/METADATA")]
    requires = [line.split(":", 1)[1].strip()
                for line in zipfile.ZipFile(wheel).read(meta).decode().splitlines()
                if line.startswith("Requires-Dist:")]
    core = [r for r in requires if "extra ==" not in r]
    eval_extra = [r for r in requires if 'extra == "eval"' in r]
    for name in ("lm-eval", "sacrebleu", "mecab-ko", "langdetect", "matplotlib", "jinja2", "httpx"):
        assert not any(r.lower().startswith(name) for r in core), (name, core)
        assert any(r.lower().startswith(name) for r in eval_extra), (name, eval_extra)
    assert any(r.startswith("lm-eval==") for r in eval_extra)
    assert any(r.startswith("torch") for r in core) and any(r.startswith("megatron-core") for r in core)
    test_extra = [r for r in requires if 'extra == "test"' in r]
    assert any(r.startswith("hcx[eval,mlflow,ray,serve,wandb]") for r in test_extra)  # sorted
    for extra in ("wandb", "mlflow"):  # the experiment trackers (logging.wandb / logging.mlflow)
        assert not any(r.lower().startswith(extra) for r in core), (extra, core)
        assert any(r.startswith(extra) and f'extra == "{extra}"' in r for r in requires), extra
    serve_extra = [r for r in requires if 'extra == "serve"' in r]  # hcx serve
    for name in ("fastapi", "uvicorn"):
        assert not any(r.lower().startswith(name) for r in core), (name, core)
        assert any(r.lower().startswith(name) for r in serve_extra), (name, serve_extra)
    assert any(r.startswith("pytest") for r in test_extra) and any(r.startswith("trl==1.5.1") for r in test_extra)


def test_installed_hcx_works_outside_the_checkout(installed, tmp_path):
    from importlib import metadata

    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    where = run("-c", "import hcx, hcx.resources as r; print(hcx.__file__); print(r.root()); "
                "print(hcx.__version__)", cwd=cwd, pythonpath=installed).stdout.split("\n")
    assert Path(where[0]).is_relative_to(installed), where  # not the checkout's hcx
    assert Path(where[1]) == installed / "hcx" / "shipped"
    assert where[2] == metadata.version("hcx")

    assert run("-m", "hcx", "--version", cwd=cwd, pythonpath=installed).stdout.strip() == \
        f"hcx {metadata.version('hcx')}"

    listing = run("-m", "hcx", "eval", "--list", cwd=cwd, pythonpath=installed).stdout
    suites = [line for line in listing.splitlines() if line.startswith("suite ")]
    tasks = [line.split()[0] for line in listing.splitlines() if not line.startswith("suite ")]
    assert len(suites) == len(repo_files("eval/suites/*.yaml"))
    assert sorted(tasks) == sorted(Path(f).stem for f in repo_files("eval/tasks/*.yaml"))
    assert "truthfulqa_mc2" in tasks  # a task whose base is in eval/tasks/_base

    for name in ("tiny.yaml", "recipes/tiny-sft.yaml"):
        printed = yaml.safe_load(run("-m", "hcx", "recipe", name, cwd=cwd,
                                     pythonpath=installed).stdout)
        tokenizer = Path(printed["data"]["tokenizer"]["path"])
        assert tokenizer == installed / "hcx/shipped/tokenizer/hcx-ko-en-32k/tokenizer.model"
        assert tokenizer.is_file()
    # tiny-sft's base: chain (tiny.yaml) came from the package; its init_from (the run of
    # `hcx pretrain tiny.yaml`) and its output_dir are the current directory's
    assert printed["name"] == "tiny-sft" and printed["model"]["num_layers"] == 4
    assert printed["checkpoint"]["init_from"] == str(cwd / "runs" / "tiny" / "checkpoints")
    assert printed["output_dir"] == "runs/tiny-sft"
    missing = run("-m", "hcx", "recipe", "no-such.yaml", cwd=cwd, pythonpath=installed, check=False)
    assert missing.returncode == 2 and "not found" in missing.stderr


def test_a_missing_extra_names_the_extra(monkeypatch, capsys, tmp_path):
    from hcx import cli
    from hcx.errors import HcxError, MissingExtra, require

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if lm-eval were not installed
    with pytest.raises(MissingExtra, match=r"pip install 'hcx\[eval\]'") as e:
        require("lm_eval", "eval", package="lm-eval", purpose="the lm-eval bridge")
    assert isinstance(e.value, HcxError) and "lm-eval" in str(e.value)
    assert cli.main(["eval", str(tmp_path), "--backend", "lm-eval", "--tasks", "kobest_copa",
                     "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "hcx: error: hcx eval --backend lm-eval needs lm-eval" in err
    assert "pip install 'hcx[eval]'" in err and "Traceback" not in err

    monkeypatch.setitem(sys.modules, "jinja2", None)
    from hcx.evaluation.tasks import load_task

    task = load_task("kobest_copa")
    with pytest.raises(MissingExtra, match=r"task prompt templates needs Jinja2.*hcx\[eval\]"):
        task.prompt({"premise": "x", "question": "cause"})


def test_a_moved_run_opens_from_anywhere(tmp_path, prepared_prefix):
    """Train from one directory with a recipe that names its tokenizer and data relatively,
    move the run folder, take the tokenizer away from where the recipe said: the moved
    checkpoint still generates and exports from a third directory."""
    project, work, elsewhere = tmp_path / "project", tmp_path / "work", tmp_path / "elsewhere"
    for d in (project / "tok", project / "data", work, elsewhere):
        d.mkdir(parents=True)
    shipped = ROOT / "tokenizer" / "hcx-ko-en-32k" / "tokenizer.model"
    shutil.copy(shipped, project / "tok" / "tokenizer.model")
    for suffix in (".bin", ".idx"):
        shutil.copy(str(prepared_prefix) + suffix, project / "data" / ("ko" + suffix))
    recipe = project / "run.yaml"
    recipe.write_text(yaml.safe_dump({
        "base": str(TINY), "name": "moved", "output_dir": "runs/moved",
        "model": {"num_layers": 2, "hidden_size": 64, "ffn_hidden_size": 176,
                  "num_attention_heads": 4, "num_query_groups": 2},
        "data": {"seq_length": 32, "eval_every": 0, "split": "100,0,0",
                 "tokenizer": {"kind": "sentencepiece", "path": "tok/tokenizer.model"},
                 "sources": [{"name": "ko", "prefix": "data/ko"}]},
        "train": {"steps": 2, "global_batch_size": 2, "micro_batch_size": 1, "warmup_steps": 0},
        "checkpoint": {"save_every": 0},
        "logging": {"progress": False, "tensorboard": False, "log_every": 1}}))

    run("-m", "hcx", "pretrain", str(recipe), cwd=work, pythonpath=ROOT)
    run_dir = work / "runs" / "moved"  # output_dir: from the current directory
    recorded = json.loads((run_dir / "recipe.json").read_text())
    assert recorded["data"]["tokenizer"]["path"] == str(project / "tok" / "tokenizer.model")
    assert recorded["data"]["sources"][0]["prefix"] == str(project / "data" / "ko")
    step = run_dir / "checkpoints" / "step_00000002"
    meta = json.loads((step / "hcx.json").read_text())
    assert meta["tokenizer_path"] == "tokenizer/tokenizer.model"
    assert (step / "tokenizer" / "tokenizer.model").read_bytes() == shipped.read_bytes()

    shutil.move(project / "tok", project / "tok.gone")  # the recorded path is gone
    moved = tmp_path / "moved-here" / "the-run"
    moved.parent.mkdir()
    shutil.move(run_dir, moved)

    from hcx.engine.inference import checkpoint_recipe

    assert checkpoint_recipe(moved / "checkpoints" / "step_00000002").data.tokenizer.path == \
        str(moved / "checkpoints" / "step_00000002" / "tokenizer" / "tokenizer.model")
    out = run("-m", "hcx", "generate", "../moved-here/the-run/checkpoints", "--prompt",
              "대한민국의 수도는", "--max-new-tokens", "3", "--json", cwd=elsewhere, pythonpath=ROOT)
    [line] = out.stdout.strip().splitlines()
    assert len(json.loads(line)["ids"]) == 3
    run("-m", "hcx", "export", "../moved-here/the-run/checkpoints", "hf", cwd=elsewhere,
        pythonpath=ROOT)
    assert (elsewhere / "hf" / "tokenizer.model").read_bytes() == shipped.read_bytes()
    assert (elsewhere / "hf" / "tokenizer.json").is_file()
