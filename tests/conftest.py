"""Shared helpers: a small recipe on real data, and running the real CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "tiny.yaml"


def data_root() -> Path:
    from hcx.paths import data_root as resolve_root

    return resolve_root()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    root = data_root()
    if not (root / "train" / "pretrain").is_dir():
        pytest.fail(f"shared data not found at {root}; set HCX_DATA_DIR or put ../shared beside "
                    "the checkout")
    return root


@pytest.fixture(scope="session")
def prepared_prefix(tmp_path_factory, shared_data) -> Path:
    """A megatron indexed dataset built directly from real Korean text (bytes tokenizer)."""
    from hcx.data.indexed import read_texts, write_indexed_dataset
    from hcx.tokenizer.loading import ByteTokenizer

    tok = ByteTokenizer()
    prefix = tmp_path_factory.mktemp("prepared") / "ko_kolaw"
    texts = read_texts(shared_data / "train/pretrain/ko_konlpy_kolaw_kobill/train.jsonl", "text")
    write_indexed_dataset((tok.encode(t) + [tok.eod] for t in texts), prefix, tok.vocab_size)
    return prefix


def small_recipe(path: Path, output_dir: Path, prefix: Path, **sections) -> Path:
    """A 2-layer recipe inheriting recipes/tiny.yaml: one prepared source, one raw file,
    UTF-8 byte tokens (the engine tests compare runs, not tokenizers)."""
    recipe = {
        "base": str(TINY),
        "name": "test",
        "output_dir": str(output_dir),
        "model": {"num_layers": 2, "hidden_size": 64, "ffn_hidden_size": 176,
                  "num_attention_heads": 4, "num_query_groups": 2},
        "data": {"seq_length": 64, "eval_every": 0, "split": "100,0,0",
                 "tokenizer": {"kind": "bytes"},
                 "prepare": {"workers": 1, "decontaminate": None},
                 "sources": [
            {"name": "ko_kolaw", "prefix": str(prefix), "weight": 0.5},
            {"name": "en_shakespeare", "weight": 0.5,
             "path": "data://train/pretrain/en_tiny_shakespeare/train.jsonl"}]},
        "train": {"steps": 6, "global_batch_size": 8, "micro_batch_size": 2, "warmup_steps": 2},
        "checkpoint": {"save_every": 2, "keep_last": 10},
        "logging": {"progress": False, "tensorboard": True, "log_every": 1},
    }
    for section, values in sections.items():
        recipe.setdefault(section, {}).update(values)
    path.write_text(yaml.safe_dump(recipe, allow_unicode=True))
    return path


SHIPPED_TOKENIZER = str(ROOT / "tokenizer" / "hcx-ko-en-32k" / "tokenizer.model")


@pytest.fixture(scope="session")
def sft_checkpoint(tmp_path_factory) -> Path:
    """A 2-layer model (hidden 64, the shipped tokenizer) fine-tuned for 2 steps: where
    the alignment and reward tests start, and their reference model."""
    d = tmp_path_factory.mktemp("sft")
    recipe = small_recipe(
        d / "sft.yaml", d / "run", d / "unused",
        data={"tokenizer": {"kind": "sentencepiece", "path": SHIPPED_TOKENIZER},
              "seq_length": 96,
              "sources": [{"name": "ko", "path": "data://train/sft/ko_koalpaca_v1_head/train.jsonl"}]},
        train={"steps": 2, "global_batch_size": 4, "micro_batch_size": 2, "warmup_steps": 0},
        checkpoint={"save_every": 0})
    hcx("sft", str(recipe))
    return d / "run" / "checkpoints"


def hcx(*args: str, timeout: int = 600, check: bool = True, **popen) -> subprocess.CompletedProcess:
    """Run the real command line, as a user would."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-m", "hcx.cli", *args], capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=ROOT, **popen)
    if check and proc.returncode != 0:
        raise AssertionError(f"hcx {' '.join(args)} exited {proc.returncode}\n"
                             f"--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-6000:]}")
    return proc


def losses(run_dir: Path) -> dict[int, float]:
    """Per-step loss from metrics.jsonl; a step logged twice (a resumed run) keeps the last."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        out[rec["step"]] = rec["loss"]
    return out
