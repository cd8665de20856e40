"""``dataset.hub`` tasks read from a local copy of the Hub repository
(``<data root>/hub/<id>``), several configs joined."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hcx.evaluation import tasks as T


def write_hub_dataset(root: Path, hub: str, configs: dict[str, list[dict]], split: str = "test") -> Path:
    """A Hub dataset repository as ``huggingface-cli download`` leaves it: a README.md
    whose YAML header names each config's data files, and those files (JSON Lines)."""
    repo = root / "hub" / hub
    header = ["---", "configs:"]
    for name, rows in configs.items():
        (repo / name).mkdir(parents=True, exist_ok=True)
        (repo / name / f"{split}.jsonl").write_text(
            "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        header += [f"- config_name: {name}", "  data_files:", f"  - split: {split}",
                   f"    path: {name}/{split}.jsonl"]
    (repo / "README.md").write_text("\n".join(header + ["---", "# test fixture", ""]), encoding="utf-8")
    return repo


@pytest.fixture
def data_root(tmp_path, monkeypatch):
    """An empty data root, with the datasets cache inside the test's folder."""
    import datasets

    monkeypatch.setenv("HCX_DATA_DIR", str(tmp_path))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    return tmp_path


def _hub_task(tmp_path: Path, dataset: dict) -> T.Task:
    spec = {"name": "toy_hub", "language": "en", "category": "test", "kind": "multiple_choice",
            "dataset": dataset, "prompt": "{{ q }}", "choices": "['x', 'y']", "target": "gold",
            "metrics": ["acc"]}
    path = tmp_path / "toy_hub.yaml"
    path.write_text(json.dumps(spec))
    return T.load_task(str(path))


def test_hub_task_reads_the_local_copy_and_joins_configs(data_root):
    write_hub_dataset(data_root, "someone/toy", {
        "first": [{"q": "a", "gold": 0}, {"q": "b", "gold": 1}],
        "second": [{"q": "c", "gold": 1}]})
    assert T.hub_mirror("someone/toy") == data_root / "hub/someone/toy"
    assert T.hub_mirror("someone/other") is None

    one = _hub_task(data_root, {"hub": "someone/toy", "config": "second"})
    docs = T.load_docs(one)
    assert [(d["q"], d["__config__"], d["__where__"]) for d in docs] == [
        ("c", "second", "someone/toy:second[0]")]

    both = _hub_task(data_root, {"hub": "someone/toy", "config": ["second", "first"]})
    docs = T.load_docs(both)
    assert [d["q"] for d in docs] == ["c", "a", "b"]  # in the order of the list
    assert [d["__where__"] for d in docs] == ["someone/toy:second[0]", "someone/toy:first[0]",
                                              "someone/toy:first[1]"]
    assert [d["q"] for d in T.load_docs(both, limit=2)] == ["c", "a"]


def test_hub_errors_name_the_task_the_key_and_the_remedy(data_root, monkeypatch):
    import datasets

    write_hub_dataset(data_root, "someone/toy", {"first": [{"q": "a", "gold": 0}]})
    task = _hub_task(data_root, {"hub": "someone/toy", "config": ["first", "missing"]})
    with pytest.raises(T.TaskError) as e:
        T.load_docs(task)
    msg = str(e.value)
    assert "task toy_hub" in msg and "dataset.hub someone/toy (config missing" in msg
    assert str(data_root / "hub/someone/toy") in msg

    # no local copy: the Hub is asked (here: it cannot be reached), and the message says
    # where a copy would be read from
    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'someone/absent' on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    task = _hub_task(data_root, {"hub": "someone/absent", "config": "c1"})
    with pytest.raises(T.TaskError) as e:
        T.load_docs(task)
    msg = str(e.value)
    assert "task toy_hub" in msg and "someone/absent (config c1, split test)" in msg
    assert f"put a copy of the dataset repository at {data_root / 'hub/someone/absent'}" in msg
    assert "ConnectionError" in msg

    for dataset, why in (({"files": "x.jsonl", "config": "c"}, "dataset.config is for dataset.hub"),
                         ({"hub": "someone/toy", "config": []}, "dataset.config is an empty list")):
        with pytest.raises(T.TaskError, match=rf"toy_hub.yaml.*dataset.*{why}"):
            _hub_task(data_root, dataset)
