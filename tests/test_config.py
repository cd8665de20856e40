"""Recipes: inheritance, overrides, and errors that name the key and where it was set."""

from pathlib import Path

import pytest

from hcx.config import RecipeError, load_recipe
from tests.conftest import TINY, hcx


def write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_tiny_recipe_loads():
    r = load_recipe(TINY)
    assert r.name == "tiny"
    assert r.model.num_query_groups == 2
    assert r.num_microbatches == r.train.global_batch_size // r.train.micro_batch_size


def test_base_inheritance_deep_merges(tmp_path):
    child = write(tmp_path, "child.yaml", f"base: {TINY}\nmodel:\n  num_layers: 8\n")
    r = load_recipe(child)
    assert r.model.num_layers == 8
    assert r.model.hidden_size == load_recipe(TINY).model.hidden_size  # kept from base


def test_base_chain_relative_paths(tmp_path):
    (tmp_path / "sub").mkdir()
    write(tmp_path, "mid.yaml", f"base: {TINY}\ntrain:\n  lr: 1.0e-3\n")
    leaf = write(tmp_path / "sub", "leaf.yaml", "base: ../mid.yaml\ntrain:\n  steps: 70\n")
    r = load_recipe(leaf)
    assert (r.train.lr, r.train.steps) == (1e-3, 70)


def test_overrides_parse_yaml_values():
    r = load_recipe(TINY, ["train.lr=3e-4", "parallel.tp=2", "model.tie_embeddings=true"])
    assert r.train.lr == pytest.approx(3e-4)
    assert r.parallel.tp == 2 and r.model.tie_embeddings is True


def test_override_into_list_item():
    r = load_recipe(TINY, ["data.sources.0.weight=0.9"])
    assert r.data.sources[0].weight == 0.9


def test_unknown_key_names_file_line_and_suggests(tmp_path):
    p = write(tmp_path, "bad.yaml", f"base: {TINY}\ntrain:\n  steps: 3\n  learning_rate: 0.1\n")
    with pytest.raises(RecipeError) as e:
        load_recipe(p)
    msg = str(e.value)
    assert f"{p}:4" in msg and "unknown key 'train.learning_rate'" in msg


def test_unknown_override_key_is_named():
    with pytest.raises(RecipeError, match=r"override 'train.lrr=1'.*unknown key 'train.lrr' \(did you mean 'lr'\?\)"):
        load_recipe(TINY, ["train.lrr=1"])


def test_wrong_type_names_key_and_value(tmp_path):
    p = write(tmp_path, "bad.yaml", f"base: {TINY}\ntrain:\n  global_batch_size: eight\n")
    with pytest.raises(RecipeError) as e:
        load_recipe(p)
    assert f"{p}:3" in str(e.value) and "train.global_batch_size" in str(e.value)
    assert "'eight'" in str(e.value)


def test_missing_required_key(tmp_path):
    p = write(tmp_path, "bad.yaml", "name: x\noutput_dir: y\n")
    with pytest.raises(RecipeError, match="missing required key 'model'"):
        load_recipe(p)


@pytest.mark.parametrize("overrides, needle", [
    (["parallel.tp=3"], "model.num_attention_heads=4 is not divisible by parallel.tp=3"),
    (["parallel.pp=3"], "model.num_layers=4 is not divisible by parallel.pp=3"),
    (["model.num_query_groups=3"], "model.num_query_groups=3 does not divide model.num_attention_heads=4"),
    (["parallel.tp=4"], "model.num_query_groups=2 is not divisible by parallel.tp=4"),
    (["parallel.sequence_parallel=true"], "parallel.sequence_parallel needs parallel.tp > 1"),
    (["train.global_batch_size=6"], "train.global_batch_size=6 is not divisible by"),
    (["data.seq_length=4096"], "exceeds model.max_position_embeddings"),
])
def test_impossible_combinations(overrides, needle):
    with pytest.raises(RecipeError) as e:
        load_recipe(TINY, overrides)
    assert needle in str(e.value)
    assert "override" in str(e.value) or str(TINY) in str(e.value)


def test_combination_error_names_recipe_line():
    with pytest.raises(RecipeError) as e:
        load_recipe(TINY, ["train.steps=10"])  # warmup (10) must be < decay length (10)
    assert f"{TINY}:" in str(e.value) and "train.warmup_steps" in str(e.value)


def test_inheritance_cycle(tmp_path):
    write(tmp_path, "a.yaml", "base: b.yaml\n")
    b = write(tmp_path, "b.yaml", "base: a.yaml\n")
    with pytest.raises(RecipeError, match="cycle"):
        load_recipe(b)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(RecipeError, match="not found"):
        load_recipe(tmp_path / "nope.yaml")
    p = write(tmp_path, "broken.yaml", "model: [1, 2\n")
    with pytest.raises(RecipeError, match="invalid YAML"):
        load_recipe(p)


def test_override_list_index_out_of_range():
    with pytest.raises(RecipeError, match=r"'data.sources' has 5 items, so '6' is not a valid index"):
        load_recipe(TINY, ["data.sources.6.weight=1"])


def test_eval_needs_a_validation_split():
    with pytest.raises(RecipeError, match="data.eval_every=50 needs a validation part"):
        load_recipe(TINY, ["data.split=100,0,0"])
    load_recipe(TINY, ["data.split=100,0,0", "data.eval_every=0"])


def test_bad_override_syntax():
    with pytest.raises(RecipeError, match="expected KEY=VALUE"):
        load_recipe(TINY, ["train.lr"])


def test_cli_rejects_bad_recipe_before_starting_processes(tmp_path):
    # tp=3 would need 3 processes; the error must come from validation, exit code 2.
    proc = hcx("pretrain", str(TINY), "parallel.tp=3", f"output_dir={tmp_path}", check=False)
    assert proc.returncode == 2
    assert "not divisible by parallel.tp=3" in proc.stderr
    assert "launching" not in proc.stderr and not (tmp_path / "metrics.jsonl").exists()


def test_cli_check_and_help():
    ok = hcx("pretrain", str(TINY), "parallel.dp=2", "--check")
    assert "ok (2 processes" in ok.stdout
    helptext = hcx("pretrain", "--help").stdout
    assert "KEY=VALUE" in helptext and "torchrun" in helptext


def test_prepare_settings_are_validated_with_their_origin():
    with pytest.raises(RecipeError, match=r"override 'data.sources.0.language=jp'.*'ko', 'en', 'code' or 'any'"):
        load_recipe(TINY, ["data.sources.0.language=jp"])
    with pytest.raises(RecipeError, match=r"data.prepare.dedup.threshold: Input should be less than 1"):
        load_recipe(TINY, ["data.prepare.dedup.threshold=1.0"])
    with pytest.raises(RecipeError, match=r"unknown key 'data.prepare.decontaminate.ngrams' \(did you mean 'ngram'\?\)"):
        load_recipe(TINY, ["data.prepare.decontaminate.ngrams=8"])
    recipe = load_recipe(TINY)
    assert [s.uses_fim for s in recipe.data.sources] == [False, False, False, False, True]


@pytest.mark.parametrize("path", sorted(Path(TINY).parent.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_recipe_validates(path):
    recipe = load_recipe(str(path), [])
    assert recipe.name == path.stem


# --- paths: relative input paths are made absolute when the recipe loads ---------------


def test_relative_input_paths_come_from_the_recipe_file_not_the_current_directory(
        tmp_path, monkeypatch):
    from tests.conftest import ROOT

    project = tmp_path / "project"
    (project / "recipes").mkdir(parents=True)
    (project / "tok").mkdir()
    (project / "tok" / "t.model").write_bytes(b"x")
    (project / "data").mkdir()
    (project / "data" / "a.jsonl").write_text("{}\n")
    (project / "data" / "p.idx").write_bytes(b"")
    (project / "ckpt").mkdir()
    base = write(project, "base.yaml", f"base: {TINY}\n"
                 "data:\n  tokenizer: {kind: sentencepiece, path: tok/t.model}\n"
                 "  sources:\n    - {name: a, path: data/a.jsonl}\n"
                 "    - {name: p, prefix: data/p}\n"
                 "    - {name: g, path: 'data/*.jsonl'}\n"
                 "    - {name: s, path: 'data://train/pretrain/x.jsonl'}\n"
                 "checkpoint:\n  init_from: ckpt\n")
    leaf = write(project / "recipes", "leaf.yaml", "base: ../base.yaml\nname: leaf\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    r = load_recipe(leaf)
    # set in base.yaml: from base.yaml's folder, whichever file is loaded and from where
    assert r.data.tokenizer.path == str(project / "tok" / "t.model")
    assert [s.path or s.prefix for s in r.data.sources] == [
        str(project / "data" / "a.jsonl"), str(project / "data" / "p"),
        str(project / "data" / "*.jsonl"), "data://train/pretrain/x.jsonl"]
    assert r.checkpoint.init_from == str(project / "ckpt")
    # outputs stay relative to the current directory
    assert r.output_dir == "runs/tiny"
    # overrides: from the current directory, as any command-line argument
    r = load_recipe(leaf, ["data.tokenizer.path=mine/t.model", "checkpoint.init_from=../ckpt"])
    assert r.data.tokenizer.path == str(elsewhere / "mine" / "t.model")
    assert r.checkpoint.init_from == str(tmp_path / "ckpt")
    # the shipped recipes' tokenizer/... from the shipped root; runs/... from the current
    # directory (where output_dir put them)
    r = load_recipe(ROOT / "recipes" / "tiny-sft.yaml")
    assert r.data.tokenizer.path == str(ROOT / "tokenizer" / "hcx-ko-en-32k" / "tokenizer.model")
    assert r.checkpoint.init_from == str(elsewhere / "runs" / "tiny" / "checkpoints")


def test_shipped_recipes_by_name_from_anywhere(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("tiny.yaml", "recipes/tiny.yaml"):
        r = load_recipe(name)
        assert r.name == "tiny" and Path(r.data.tokenizer.path).is_file()
    assert load_recipe("tiny-dpo.yaml").checkpoint.init_from == \
        str(tmp_path / "runs" / "tiny-sft" / "checkpoints")
    with pytest.raises(RecipeError, match="not found"):
        load_recipe("no-such-recipe.yaml")
