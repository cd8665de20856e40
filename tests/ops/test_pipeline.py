"""hcx run: stages cached by the hash of their inputs, skipped when done, resumed in place
when interrupted, started afresh (with everything after them) when their inputs change."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.conftest import hcx
from hcx.ops.pipeline import PipelineError, Stage, load_pipeline, run_pipeline


def write(path: Path, spec: dict) -> Path:
    path.write_text(yaml.safe_dump(spec, allow_unicode=True))
    return path


def test_references_are_checked(tmp_path):
    base = {"name": "p", "output_dir": str(tmp_path / "out")}
    bad = write(tmp_path / "a.yaml", {**base, "stages": [
        {"name": "one", "run": ["report", "${two}"]}, {"name": "two", "run": ["x"]}]})
    with pytest.raises(PipelineError, match=r"stage 'one' names \$\{two\}, a later stage"):
        load_pipeline(bad)
    bad = write(tmp_path / "b.yaml", {**base, "stages": [{"name": "one", "run": ["x", "${nope}"]}]})
    with pytest.raises(PipelineError, match=r"\$\{nope\}, which is no stage"):
        load_pipeline(bad)
    for stage_dir in ("${output_dir}", str(tmp_path)):
        bad = write(tmp_path / "d.yaml", {**base, "stages": [
            {"name": "one", "run": ["report", "x"], "dir": stage_dir}]})
        with pytest.raises(PipelineError, match="would hold the pipeline's output_dir"):
            run_pipeline(bad, dry_run=True, echo=lambda b: None, log=lambda m: None)
    bad = write(tmp_path / "e.yaml", {**base, "stages": [
        {"name": "one", "run": ["x"]}, {"name": "two", "run": ["x"], "dir": "${output_dir}/one/sub"}]})
    with pytest.raises(PipelineError, match="stages one and two share the folder"):
        run_pipeline(bad, dry_run=True, echo=lambda b: None, log=lambda m: None)
    bad = write(tmp_path / "c.yaml", {**base, "stages": [{"name": "one", "runn": ["x"]}]})
    with pytest.raises(PipelineError, match=r"c.yaml:5: unknown key 'stages.0.runn' \(did you mean 'run'"):
        load_pipeline(bad)


def test_key_follows_the_files_a_stage_names(tmp_path):
    """A recipe named by a stage is hashed with its base: chain; a change to the base
    changes the key, as does a changed word or a changed upstream key."""
    (tmp_path / "base.yaml").write_text("train: {steps: 1}\n")
    (tmp_path / "r.yaml").write_text("base: base.yaml\nname: r\n")
    spec = load_pipeline(write(tmp_path / "p.yaml", {"name": "p", "output_dir": str(tmp_path / "o"),
                                                    "stages": [{"name": "a", "run": ["x"]},
                                                               {"name": "b", "run": ["pretrain", str(tmp_path / "r.yaml"), "in=${a}"]}]}))
    a = Stage(spec.stages[0], tmp_path / "o", {})
    b = Stage(spec.stages[1], tmp_path / "o", {"a": str(a.output)})
    assert b.argv == ["pretrain", str(tmp_path / "r.yaml"), f"in={tmp_path / 'o' / 'a'}"]
    assert b.uses == ["a"]
    k = b.key({"a": "k1"})
    assert b.key({"a": "k1"}) == k and b.key({"a": "k2"}) != k
    (tmp_path / "base.yaml").write_text("train: {steps: 2}\n")
    assert b.key({"a": "k1"}) != k


def test_key_ignores_what_the_stage_writes(tmp_path):
    """A file the stage writes (``--out ${dir}/pairs.jsonl``, or its ``output``) is not an
    input: its appearing after the first run must not change the key (the stage and every
    one after it would rerun on each ``hcx run``)."""
    spec = load_pipeline(write(tmp_path / "p.yaml", {
        "name": "p", "output_dir": str(tmp_path / "o"), "stages": [
            {"name": "a", "run": ["data", "feedback", "--out", "${dir}/pairs.jsonl"]},
            {"name": "b", "run": ["generate", "x", "--log", "${output_dir}/logs/b.log"],
             "output": "${output_dir}/logs/b.log"}]}))
    a = Stage(spec.stages[0], tmp_path / "o", {})
    b = Stage(spec.stages[1], tmp_path / "o", {})
    before = a.key({}), b.key({})
    (tmp_path / "o" / "a").mkdir(parents=True)
    (tmp_path / "o" / "a" / "pairs.jsonl").write_text("{}\n")
    (tmp_path / "o" / "logs").mkdir()
    (tmp_path / "o" / "logs" / "b.log").write_text("done\n")
    assert (a.key({}), b.key({})) == before


@pytest.mark.slow
def test_pipeline_caches_resumes_and_reruns_changed_stages(tmp_path, sft_checkpoint):
    out = tmp_path / "out"

    def pipeline(limit: int, tasks: str = "kobest_copa,kobest_boolq") -> Path:
        return write(tmp_path / "p.yaml", {"name": "t", "output_dir": str(out), "stages": [
            {"name": "ev", "run": ["eval", str(sft_checkpoint), "--tasks", tasks,
                                   "--limit", str(limit), "--out", "${dir}"]},
            {"name": "report", "run": ["report", "${ev}", "--out", "${dir}"],
             "output": "${dir}/report.html"}]})

    def state() -> dict:
        return json.loads((out / "pipeline.json").read_text())["stages"]

    first = hcx("run", str(pipeline(3)))
    assert first.stdout.strip() == str(out / "report" / "report.html")
    assert (out / "report" / "report.html").is_file()
    assert {s: r["status"] for s, r in state().items()} == {"ev": "done", "report": "done"}
    assert "kobest_copa" in (out / "logs" / "ev.log").read_text()

    again = hcx("run", str(pipeline(3)))  # nothing changed: both kept
    assert again.stderr.count("done before") == 2

    # Interrupted (the record says running): the stage runs again in its folder and the
    # evaluator keeps its finished tasks; the report after it is made again (it is built
    # on a stage that ran).
    records = json.loads((out / "pipeline.json").read_text())
    records["stages"]["ev"]["status"] = "running"
    (out / "pipeline.json").write_text(json.dumps(records))
    resumed = hcx("run", str(pipeline(3)))
    assert "[1/2] ev: resuming" in resumed.stderr
    assert resumed.stderr.count("done before, kept") == 2  # the evaluator's two tasks
    assert "[2/2] report: running" in resumed.stderr

    # Changed inputs: the folder is cleared, the stage and the one after it rerun.
    (out / "ev" / "stale").write_text("from the old run")
    changed = hcx("run", str(pipeline(4)))
    assert "[1/2] ev: running" in changed.stderr and "[2/2] report: running" in changed.stderr
    assert not (out / "ev" / "stale").exists()
    assert json.loads((out / "ev" / "scores.json").read_text())["limit"] == 4

    # A failing stage stops the pipeline, says where its log is, and is retried next time.
    failed = hcx("run", str(pipeline(4, tasks="kobest_cpoa")), check=False)
    assert failed.returncode == 1 and "stage ev failed" in failed.stderr
    assert "did you mean 'kobest_copa'" in (out / "logs" / "ev.log").read_text()
    assert state()["ev"]["status"] == "failed"
    fixed = hcx("run", str(pipeline(4)))
    assert "[1/2] ev: running" in fixed.stderr and state()["ev"]["status"] == "done"


def test_from_reruns_a_cached_stage(tmp_path):
    report_in = tmp_path / "run"
    (report_in / "samples").mkdir(parents=True)
    (report_in / "scores.json").write_text(json.dumps({
        "format": 1, "model": {"name": "m", "path": "/m", "kind": "hf", "step": None},
        "created": "2026-11-23T00:00:00Z", "limit": None, "hcx_version": "0.1.0",
        "tasks": {"t": {"language": "ko", "category": "reasoning", "kind": "multiple_choice",
                        "n": 2, "primary": "acc", "seconds": 1.0,
                        "metrics": {"acc": {"value": 0.5, "stderr": 0.5, "higher_is_better": True}}}}}))
    path = write(tmp_path / "p.yaml", {"name": "t", "output_dir": str(tmp_path / "out"), "stages": [
        {"name": "report", "run": ["report", str(report_in), "--out", "${dir}"]}]})
    logs: list[str] = []
    run_pipeline(path, echo=lambda b: None, log=logs.append)
    run_pipeline(path, echo=lambda b: None, log=logs.append)
    run_pipeline(path, from_stage="report", echo=lambda b: None, log=logs.append)
    heads = [m for m in logs if m.startswith("[1/1] report:")]
    assert heads[0].startswith("[1/1] report: running") and "kept" in heads[2]
    assert heads[3].startswith("[1/1] report: running")
    with pytest.raises(PipelineError, match="--from nope: no such stage"):
        run_pipeline(path, from_stage="nope", echo=lambda b: None, log=logs.append)


def test_demo_pipeline_is_valid(tmp_path):
    """The pipeline make demo runs: every stage resolves, and every training stage's
    recipe with its overrides validates (as `hcx pretrain --check` would)."""
    from hcx.config import load_recipe

    root = Path(__file__).resolve().parents[2]
    demo = root / "recipes" / "pipeline" / "demo.yaml"
    logs: list[str] = []
    run_pipeline(demo, dry_run=True, echo=lambda b: None, log=logs.append)
    spec = load_pipeline(demo)
    assert [s.name for s in spec.stages][:5] == ["tokenizer", "prepare", "pretrain", "sft", "dpo"]
    assert spec.stages[-1].name == "report"
    outputs: dict[str, str] = {}
    for s in spec.stages:
        stage = Stage(s, Path(spec.output_dir), outputs)
        outputs[s.name] = str(stage.output)
        if stage.argv[0] in ("pretrain", "sft", "align"):
            recipe = load_recipe(root / stage.argv[1], stage.argv[2:])
            if stage.argv[0] == "pretrain":
                assert recipe.parallel.tp * recipe.parallel.pp == 2  # the real multi-process engine
    assert len([m for m in logs if ": running: hcx " in m or "done before" in m]) == len(spec.stages)
