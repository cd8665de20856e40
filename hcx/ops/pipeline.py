"""``hcx run PIPELINE``: stages (hcx commands) run in order, each cached by a hash of its
inputs, so a rerun skips what is done and an interrupted run resumes where it stopped.

A pipeline file (``recipes/pipeline/*.yaml``) lists stages; a stage is an hcx command line
(``run``: its words), the folder it works in (``dir``, default ``<output_dir>/<name>``) and
what it produces (``output``, default ``dir``). Words may name ``${output_dir}``,
``${dir}`` (the stage's own folder) and ``${STAGE}`` (an earlier stage's output), which is
also how stages depend on each other.

A stage's key is a hash of its command after substitution, of every file its words name
(a recipe with its ``base:`` chain), and of the keys of the stages it uses. Its record in
``<output_dir>/pipeline.json``:

- done with the same key and its output present: skipped;
- started with the same key but not done (a crash, Ctrl-C, a failure): run again in the
  same folder, where every hcx stage resumes (training from its newest checkpoint,
  evaluation from its finished tasks, data preparation from its cache);
- anything else (new inputs or settings): its folder is cleared first, so a changed
  recipe never resumes an old run's checkpoints; the stages after it follow, as their
  keys include its key.

What a stage reads through a recipe (data files under the data root, the Python standard
library) is not hashed: those are inputs that do not change between runs; ``--from STAGE``
reruns from a stage when they do.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import yaml
from pydantic import Field, model_validator

from hcx.config import RecipeError, Strict, load_config
from hcx.errors import HcxError, Stopped
from hcx.files import write_text_atomic

STATE = "pipeline.json"
_REF = re.compile(r"\$\{([A-Za-z0-9_.-]+)\}")


class PipelineError(HcxError, ValueError):
    pass


class StageSpec(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]+$")
    run: list[str] = Field(min_length=1, description="the hcx command's words (after `hcx`)")
    dir: str | None = Field(default=None, description="the stage's folder (default "
                                                      "${output_dir}/<name>), cleared when "
                                                      "its inputs change")
    output: str | None = Field(default=None, description="what it produces (default: dir); "
                                                         "${<name>} in later stages")
    description: str = ""


class PipelineSpec(Strict):
    name: str
    description: str = ""
    output_dir: str
    stages: list[StageSpec] = Field(min_length=1)

    @model_validator(mode="after")
    def _references(self):
        seen: list[str] = []
        for stage in self.stages:
            if stage.name in seen or stage.name in ("output_dir", "dir"):
                raise ValueError(f"stage name {stage.name!r} is used twice or reserved")
            words = [*stage.run, stage.dir or "", stage.output or ""]
            for ref in {m for w in words for m in _REF.findall(w)}:
                if ref not in ("output_dir", "dir") and ref not in seen:
                    later = any(s.name == ref for s in self.stages)
                    raise ValueError(
                        f"stage {stage.name!r} names ${{{ref}}}, " +
                        ("a later stage: stages run in order" if later else
                         f"which is no stage (stages before it: {', '.join(seen) or 'none'})"))
            seen.append(stage.name)
        return self


def load_pipeline(path: str | Path) -> PipelineSpec:
    from hcx.resources import recipe_path

    try:
        spec, _ = load_config(recipe_path(path), PipelineSpec, what="pipeline")
    except RecipeError as e:
        raise PipelineError(str(e)) from None
    return spec


# --- resolving stages ----------------------------------------------------------------


class Stage:
    """A stage with its words substituted, its folder, output and dependencies."""

    def __init__(self, spec: StageSpec, output_dir: Path, outputs: dict[str, str]):
        self.spec = spec
        self.name = spec.name
        self.dir = Path(_substitute(spec.dir or f"${{output_dir}}/{spec.name}",
                                    {"output_dir": str(output_dir)}, spec.name))
        values = {**outputs, "output_dir": str(output_dir), "dir": str(self.dir)}
        self.argv = [_substitute(w, values, spec.name) for w in spec.run]
        self.output = Path(_substitute(spec.output, values, spec.name)) if spec.output else self.dir
        self.uses = sorted({m for w in spec.run for m in _REF.findall(w)} & set(outputs))

    def key(self, upstream: dict[str, str]) -> str:
        h = hashlib.sha256()
        h.update(json.dumps({"argv": self.argv, "uses": {u: upstream[u] for u in self.uses}},
                            sort_keys=True).encode())
        for word in self.argv:
            for path in _named_files(word):
                if self.writes(path):  # its own output is not an input: a rerun would differ
                    continue
                h.update(str(path).encode())
                h.update(_file_digest(path).encode())
        return h.hexdigest()[:20]


    def writes(self, path: Path) -> bool:
        """Whether ``path`` is the stage's output or inside its folder."""
        path = path.resolve()
        return path == self.output.resolve() or path.is_relative_to(self.dir.resolve())


def _substitute(word: str, values: dict[str, str], stage: str) -> str:
    def value(m: re.Match) -> str:
        if m.group(1) not in values:
            raise PipelineError(f"stage {stage}: ${{{m.group(1)}}} has no value here")
        return values[m.group(1)]

    return _REF.sub(value, word)


def _named_files(word: str) -> list[Path]:
    """Files a command word names: the word itself, or the value of KEY=VALUE; a YAML
    file brings its ``base:`` chain (a recipe's settings live in all of them)."""
    from hcx.resources import recipe_path

    text = word.split("=", 1)[1] if "=" in word and not word.startswith("-") else word
    try:
        path = recipe_path(text) if text.endswith((".yaml", ".yml")) else Path(text)
        if not path.is_file():
            return []
    except OSError:  # a word too long to be a path
        return []
    files = [path]
    if path.suffix in (".yaml", ".yml"):
        base = (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("base")
        if isinstance(base, str):
            files += _named_files(str(path.parent / base))
    return files


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# --- state ---------------------------------------------------------------------------


def _read_state(output_dir: Path) -> dict:
    path = output_dir / STATE
    if not path.is_file():
        return {"stages": {}}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise PipelineError(f"{path}: not valid JSON ({e}); delete it to start over") from None


def _write_state(output_dir: Path, state: dict) -> None:
    write_text_atomic(output_dir / STATE, json.dumps(state, indent=1))


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# --- running -------------------------------------------------------------------------


def _run_logged(argv: list[str], log_path: Path, echo) -> int:
    """Run ``hcx ARGV`` with its output shown and kept in ``log_path``; SIGTERM/SIGINT
    are passed on to it (the stages stop cleanly and save)."""
    cmd = [sys.executable, "-m", "hcx.cli", *argv]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    received: list[int] = []
    child: subprocess.Popen | None = None

    def forward(signum, frame):
        received.append(signum)
        if child is not None:
            child.send_signal(signum)

    with log_path.open("ab") as log:
        log.write(f"\n$ hcx {' '.join(argv)}    # {_now()}\n".encode())
        log.flush()
        # The stage runs in a session of its own, so a Ctrl-C at the terminal reaches it
        # once, through us: hcx's stages save on the first signal and die on a second.
        old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"},
                                     start_new_session=True)
            if received:  # a signal that came before the child existed
                child.send_signal(received[0])
            assert child.stdout is not None
            while chunk := os.read(child.stdout.fileno(), 1 << 14):
                log.write(chunk)
                log.flush()
                echo(chunk)
            code = child.wait()
        finally:
            for s, handler in old.items():
                signal.signal(s, handler)
    if received:
        raise Stopped(f"stopped by signal {received[0]}; rerun the same command to resume",
                      received[0])
    return code


def _echo_bytes(chunk: bytes) -> None:
    sys.stderr.buffer.write(chunk)
    sys.stderr.buffer.flush()


def _check_dirs(stages: list[Stage], output_dir: Path) -> None:
    """A stage's folder is cleared when its inputs change: it must not be (or hold) the
    pipeline's own folder, the working directory, or another stage's folder."""
    protected = {output_dir.resolve(), Path.cwd().resolve()}
    seen: dict[Path, str] = {}
    for stage in stages:
        d = stage.dir.resolve()
        if any(d == p or d in p.parents for p in protected):
            raise PipelineError(f"stage {stage.name}: its folder {stage.dir} would hold the "
                                f"pipeline's output_dir or the working directory; give it "
                                f"dir: ${{output_dir}}/{stage.name}")
        for other, name in seen.items():
            if d == other or d in other.parents or other in d.parents:
                raise PipelineError(f"stages {name} and {stage.name} share the folder "
                                    f"{other} (each stage's folder is its own)")
        seen[d] = stage.name


def run_pipeline(path: str | Path, from_stage: str | None = None, dry_run: bool = False,
                 echo=_echo_bytes, log=print) -> Path:
    """Run a pipeline; returns the last stage's output (the report)."""
    spec = load_pipeline(path)
    names = [s.name for s in spec.stages]
    if from_stage is not None and from_stage not in names:
        raise PipelineError(f"--from {from_stage}: no such stage (stages: {', '.join(names)})")
    output_dir = Path(spec.output_dir)
    stages: list[Stage] = []
    outputs: dict[str, str] = {}
    for s in spec.stages:
        stage = Stage(s, output_dir, outputs)
        outputs[s.name] = str(stage.output)
        stages.append(stage)
    _check_dirs(stages, output_dir)
    if not dry_run:
        output_dir.mkdir(parents=True, exist_ok=True)
    state = _read_state(output_dir)
    keys: dict[str, str] = {}
    forced = False
    total = time.perf_counter()
    for i, stage in enumerate(stages, 1):
        key = keys[stage.name] = stage.key(keys)
        record = state["stages"].get(stage.name, {})
        forced = forced or stage.name == from_stage
        head = f"[{i}/{len(stages)}] {stage.name}"
        if not forced and record.get("key") == key and record.get("status") == "done" \
                and stage.output.exists():
            log(f"{head}: done before ({record.get('seconds', 0):.0f}s), kept")
            continue
        resume = record.get("key") == key and not forced
        log(f"{head}: {'resuming' if resume and stage.dir.exists() else 'running'}: "
            f"hcx {' '.join(stage.argv)}")
        if dry_run:
            continue
        if not resume and stage.dir.exists():
            shutil.rmtree(stage.dir)  # other inputs: never resume another run's state
        # What comes after is built on this stage's new output: none of it is done any
        # more, even where its key (which follows inputs, not runs) stays the same.
        for later in stages[i:]:
            state["stages"].pop(later.name, None)
        state["stages"][stage.name] = {"key": key, "status": "running", "started": _now()}
        _write_state(output_dir, state)
        start = time.perf_counter()
        code = _run_logged(stage.argv, output_dir / "logs" / f"{stage.name}.log", echo)
        seconds = time.perf_counter() - start
        if code != 0:
            state["stages"][stage.name].update(status="failed", seconds=round(seconds, 1))
            _write_state(output_dir, state)
            raise PipelineError(f"stage {stage.name} failed (exit {code}) after {seconds:.0f}s; "
                                f"its log: {output_dir / 'logs' / (stage.name + '.log')}; fix "
                                f"the cause and rerun: finished stages are kept")
        if not stage.output.exists():
            raise PipelineError(f"stage {stage.name} finished but its output {stage.output} "
                                f"does not exist; check the stage's words in {path}")
        state["stages"][stage.name].update(status="done", seconds=round(seconds, 1),
                                           finished=_now())
        _write_state(output_dir, state)
        log(f"{head}: done in {seconds:.0f}s")
    log(f"pipeline {spec.name}: {len(stages)} stages, {time.perf_counter() - total:.0f}s")
    return stages[-1].output
