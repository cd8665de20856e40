"""hcx export and import: checkpoints of any layout become HF Llama directories with the
same logits, and HF Llama directories become checkpoints that continue pretraining."""

import json
import re
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
import yaml

from tests.conftest import ROOT, hcx, losses, small_recipe

pytestmark = pytest.mark.slow

TOKENIZER = ROOT / "tokenizer" / "hcx-ko-en-32k" / "tokenizer.model"
TEXT = ["안녕하세요, 한국어와 English를 함께 배우는 모델입니다.", "The quick brown fox 여우"]
LAYOUTS = {
    "tp1": ([], {}),
    "tp1-tied": ([], {"tie_embeddings": True}),
    "tp2": (["parallel.tp=2", "parallel.sequence_parallel=true"], {}),
    "pp2": (["parallel.pp=2"], {}),
}


def train(tmp, prepared_prefix, *overrides, **model):
    recipe = small_recipe(tmp / "recipe.yaml", tmp / "run", prepared_prefix,
                          model={"num_layers": 2, "hidden_size": 64, "ffn_hidden_size": 176,
                                 "num_attention_heads": 4, "num_query_groups": 2, **model},
                          data={"tokenizer": {"kind": "sentencepiece", "path": str(TOKENIZER)}},
                          train={"steps": 3}, checkpoint={"save_every": 0})
    hcx("pretrain", str(recipe), *overrides)
    return recipe, tmp / "run" / "checkpoints"


@pytest.fixture(scope="module")
def exported(tmp_path_factory, prepared_prefix):
    """``exported(layout)``: (recipe, checkpoints dir, HF directory) of a 3-step run at
    that layout and its ``hcx export``; each made once for the module's tests."""
    made = {}

    def get(layout):
        if layout not in made:
            overrides, model = LAYOUTS[layout]
            tmp = tmp_path_factory.mktemp(layout)
            recipe, ckpt = train(tmp, prepared_prefix, *overrides, **model)
            hcx("export", str(ckpt), str(tmp / "hf"), "--to", "hf")
            made[layout] = recipe, ckpt, tmp / "hf"
        return made[layout]

    return get


def megatron_logits(recipe, ckpt, out, *overrides):
    """Logits of the checkpoint loaded at TP1/PP1 by the engine (a worker process)."""
    subprocess.run([sys.executable, "tests/workers/logits.py", str(recipe), str(ckpt), str(out),
                    "parallel.tp=1", "parallel.pp=1", "parallel.sequence_parallel=false",
                    *overrides], cwd=ROOT, check=True, capture_output=True)
    return torch.load(out)


def hf_logits(directory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(directory))
    model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32)
    ids = [tok.encode(t)[:32] for t in TEXT]
    tokens = torch.tensor([i + [tok.pad_token_id] * (32 - len(i)) for i in ids])
    with torch.no_grad():
        return model(tokens).logits[..., :len(tok)], tok


@pytest.mark.parametrize("layout", LAYOUTS)
def test_export_gives_the_same_logits_in_transformers(tmp_path, exported, layout):
    recipe, ckpt, hf = exported(layout)
    tied = bool(LAYOUTS[layout][1])
    config = json.loads((hf / "config.json").read_text())
    assert config["num_key_value_heads"] == 2 and config["tie_word_embeddings"] == tied
    got, tok = hf_logits(hf)
    want = megatron_logits(recipe, ckpt / "step_00000003", tmp_path / "logits.pt")
    assert got.shape == want.shape
    assert (got - want).abs().max().item() < 1e-4
    # the tokenizer travels with the model, chat template included
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                   add_generation_prompt=True) == "<|user|>hi<|endofturn|><|assistant|>"


@pytest.mark.parametrize("layout", ["tp2", "pp2"])
def test_streamed_export_equals_megatrons_own_load(exported, layout):
    """The export reads the checkpoint's files layer by layer; megatron's loader, loading
    the whole model at TP=1 (the reference), gives the same tensors bit for bit."""
    from safetensors.torch import load_file

    from hcx.interop.hf import read_checkpoint

    _, ckpt, hf = exported(layout)
    streamed = load_file(hf / "model.safetensors")
    loaded = read_checkpoint(ckpt, log=lambda *a: None).tensors
    assert sorted(streamed) == sorted(loaded)
    for name, tensor in loaded.items():
        assert torch.equal(streamed[name], tensor), name


def test_export_of_a_non_checkpoint_names_it(tmp_path):
    proc = hcx("export", str(tmp_path), str(tmp_path / "out"), check=False)
    assert proc.returncode == 1 and f"{tmp_path}: not an hcx checkpoint" in proc.stderr


# --- import ----------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["tp1", "tp1-tied"])
def test_import_of_an_export_reproduces_every_weight(tmp_path, exported, layout):
    from hcx.interop.hf import import_hf, read_checkpoint
    from hcx.tokenizer.loading import SentencePieceTokenizer, open_tokenizer

    recipe, ckpt, hf = exported(layout)
    import_hf(hf, tmp_path / "imported")  # in this process; the next test runs the CLI
    original = read_checkpoint(ckpt)
    imported = read_checkpoint(tmp_path / "imported" / "checkpoint")
    assert sorted(imported.tensors) == sorted(original.tensors)
    for name, tensor in original.tensors.items():
        assert imported.tensors[name].dtype == tensor.dtype, name
        assert torch.equal(imported.tensors[name], tensor), name
    # the model section round-trips (the import states the padded vocabulary it read)
    # (an hcx model exports as Llama, and imports as one)
    assert imported.recipe.model == original.recipe.model.model_copy(
        update={"vocab_size": original.vocab_size, "family": "llama"})
    # the exported tokenizer, now the recipe's, encodes as the SentencePiece original
    tok = open_tokenizer(imported.recipe.data.tokenizer.path)
    assert [tok.encode(t) for t in TEXT] == [SentencePieceTokenizer(TOKENIZER).encode(t) for t in TEXT]


@pytest.fixture(scope="module")
def hf_llama(tmp_path_factory):
    """A random transformers Llama beside the shipped tokenizer.json (no tokenizer config:
    the eos token is known from config.json only), saved in shards with an index. GQA,
    untied, a vocabulary of 32768 + 45 (not a multiple of 128), non-default RoPE base
    and RMSNorm epsilon."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=32768 + 45,
                         rope_theta=50000.0, rms_norm_eps=1e-5, max_position_embeddings=128,
                         tie_word_embeddings=False, pad_token_id=0, bos_token_id=2,
                         eos_token_id=3)
    model = LlamaForCausalLM(config).eval()
    directory = tmp_path_factory.mktemp("hf-llama") / "llama-tiny"
    model.save_pretrained(directory, max_shard_size="4MB")
    shutil.copy(TOKENIZER.with_name("tokenizer.json"), directory)
    assert (directory / "model.safetensors.index.json").is_file()
    return model, directory


def test_import_of_a_transformers_llama_gives_its_logits_and_continues_pretraining(
        tmp_path, hf_llama):
    from hcx.config import load_recipe
    from hcx.data.indexed import build_datasets, materialize_sources
    from hcx.stages.pretrain import microbatches
    from hcx.engine.model import padded_vocab_size
    from hcx.tokenizer.loading import load_tokenizer

    model, hf = hf_llama
    out = tmp_path / "imported"
    proc = hcx("import", str(hf), str(out), "--tp", "2")
    assert proc.stdout.strip() == str(out / "recipe.yaml")
    stub = yaml.safe_load((out / "recipe.yaml").read_text())
    assert stub["parallel"] == {"tp": 2, "pp": 1} and "sources" not in stub["data"]
    assert stub["model"]["rope_base"] == 50000.0 and stub["model"]["norm_epsilon"] == 1e-5
    assert f"base: {out / 'recipe.yaml'}" in proc.stderr
    recipe = tmp_path / "continue.yaml"
    recipe.write_text(yaml.safe_dump({
        "base": str(out / "recipe.yaml"), "name": "continue", "output_dir": str(tmp_path / "run"),
        "data": {"seq_length": 32, "split": "100,0,0",
                 "prepare": {"workers": 1, "decontaminate": None},
                 "sources": [{"name": "en_shakespeare",
                              "path": "data://train/pretrain/en_tiny_shakespeare/train.jsonl"}]},
        "train": {"steps": 2, "global_batch_size": 4, "micro_batch_size": 2, "warmup_steps": 0},
        "logging": {"progress": False, "tensorboard": False},
    }))

    # The engine's logits equal transformers' (TP=1 here; TP=2 below, in training).
    tok = load_tokenizer(load_recipe(recipe).data.tokenizer)
    want = megatron_logits(recipe, out / "checkpoint", tmp_path / "logits.pt")
    ids = [tok.encode(t)[:32] for t in TEXT]
    tokens = torch.tensor([i + [tok.pad] * (32 - len(i)) for i in ids])
    with torch.no_grad():
        got = model(tokens).logits[..., :tok.vocab_size]
    assert (got - want).abs().max().item() < 1e-4

    # Continued pretraining at TP=2 (the stub's layout) starts from transformers' loss on
    # its first batch. megatron's softmax spans the padded vocabulary, whose rows the
    # import made zero: logits of 0 there.
    hcx("pretrain", str(recipe))
    first = losses(tmp_path / "run")[1]
    r = load_recipe(recipe)
    data = build_datasets(r, materialize_sources(r, tok), tok).train
    padding = padded_vocab_size(model.config.vocab_size, 2) - model.config.vocab_size
    total = count = 0.0
    with torch.no_grad():
        for mb in microbatches(data, 0, r.train.global_batch_size, r.train.micro_batch_size, 1, 0):
            logits = F.pad(model(mb["tokens"]).logits, (0, padding))
            nll = F.cross_entropy(logits.flatten(0, 1), mb["labels"].flatten(), reduction="none")
            total += (nll * mb["loss_mask"].flatten()).sum().item()
            count += mb["loss_mask"].sum().item()
    assert abs(first - total / count) < 1e-4


def test_import_errors_name_the_tensor_the_key_and_the_constraint(tmp_path, hf_llama):
    from safetensors.torch import load_file, save_file

    from hcx.config import RecipeError
    from hcx.interop.hf import InteropError, import_hf

    model, _ = hf_llama
    hf = tmp_path / "llama"
    model.save_pretrained(hf)  # one model.safetensors
    shutil.copy(TOKENIZER.with_name("tokenizer.json"), hf)
    config = json.loads((hf / "config.json").read_text())

    with pytest.raises(RecipeError, match=re.escape(
            "--tp 3: parallel.tp: model.num_attention_heads=4 is not divisible by parallel.tp=3")):
        import_hf(hf, tmp_path / "out", tp=3)

    (hf / "config.json").write_text(json.dumps({**config, "attention_bias": True}))
    with pytest.raises(InteropError, match=re.escape(
            f"{hf / 'config.json'}: attention_bias=True is not supported")):
        import_hf(hf, tmp_path / "out")
    (hf / "config.json").write_text(json.dumps(config))

    tensors = load_file(hf / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight"] = torch.zeros(175, 64)
    save_file(tensors, hf / "model.safetensors")
    proc = hcx("import", str(hf), str(tmp_path / "out"), check=False)
    assert proc.returncode == 1
    assert (f"{hf / 'model.safetensors'}: tensor model.layers.1.mlp.up_proj.weight has shape "
            "[175, 64], but config.json gives [176, 64]") in proc.stderr
    assert not (tmp_path / "out").exists() and [p.name for p in tmp_path.iterdir()] == ["llama"]


def test_import_refuses_to_overwrite_what_it_did_not_write(tmp_path, hf_llama):
    from hcx.interop.hf import InteropError, import_hf

    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    with pytest.raises(InteropError, match="is not the output of an earlier 'hcx import'"):
        import_hf(hf_llama[1], tmp_path / "out")
    assert (tmp_path / "out" / "notes.txt").read_text() == "mine"


LLAMA = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 176,
         "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 300}


@pytest.mark.parametrize("change, refused", [
    ({"model_type": "gpt2"}, "model_type='gpt2'"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ({"mlp_bias": True}, "mlp_bias=True"),
    ({"attention_bias": True}, "attention_bias=True"),  # on o_proj too
    ({"rope_scaling": {"rope_type": "linear", "factor": 8.0}}, "rope_scaling.rope_type='linear'"),
    ({"rope_parameters": {"rope_theta": 1e4, "rope_type": "yarn"}}, "rope_parameters.rope_type='yarn'"),
    ({"rope_theta": 10000.5}, "rope_theta=10000.5"),
    ({"model_type": "mistral", "sliding_window": 4096}, "sliding_window=4096"),
    ({"model_type": "mistral"}, "sliding_window=4096"),  # transformers' Mistral default
])
def test_unsupported_configs_are_refused_naming_the_key(change, refused):
    from hcx.interop.hf import InteropError, model_from_hf

    with pytest.raises(InteropError, match=re.escape(f"config.json: {refused} is not supported")):
        model_from_hf({**LLAMA, **change})


def test_configs_of_either_transformers_generation_map_to_the_model():
    from hcx.interop.hf import model_from_hf

    old = model_from_hf({**LLAMA, "rope_theta": 5e5, "rope_scaling": None, "rms_norm_eps": 1e-5})
    new = model_from_hf({**LLAMA, "rope_parameters": {"rope_theta": 5e5, "rope_type": "default"},
                         "rms_norm_eps": 1e-5})
    assert old == new and old["rope_base"] == 5e5 and old["num_query_groups"] == 4
    mistral = model_from_hf({**LLAMA, "model_type": "mistral", "sliding_window": None,
                             "num_attention_heads": 16})
    assert mistral["num_query_groups"] == 8 and mistral["norm_epsilon"] == 1e-6  # its defaults
