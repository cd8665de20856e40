"""hcx import/export of each supported Hugging Face family: a small random transformers
model (GQA, the family's options, 2 layers, hidden 64) imports with transformers' logits
(positions past Llama 3's original context included), and exports back to the same
tensors, bit for bit, under the family's names."""

import gc
import json
import re
import shutil
import subprocess
import sys

import pytest
import torch
import yaml

from tests.conftest import ROOT

TOKENIZER_JSON = ROOT / "tokenizer" / "hcx-ko-en-32k" / "tokenizer.json"
SHAPE = dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=32768 + 45, pad_token_id=0, bos_token_id=2,
             eos_token_id=3)
# Llama 3.1's rule with a short original context, so that the test's 40 positions run past
# it, and EXAONE with parameters other than megatron's built-in ones (1, 4, 8192).
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16, "rope_theta": 10000.0}
EXAONE_ROPE = {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 2.0,
               "high_freq_factor": 8.0, "original_max_position_embeddings": 12,
               "rope_theta": 1000000.0}


def family_config(family: str):
    import transformers as t

    if family == "llama3":
        return t.LlamaConfig(**SHAPE, rope_parameters=LLAMA3, max_position_embeddings=64,
                             rms_norm_eps=1e-5)
    if family == "mistral":
        return t.MistralConfig(**SHAPE, sliding_window=None, max_position_embeddings=64)
    if family == "qwen2":  # tied, as the small Qwen2.5 models
        return t.Qwen2Config(**SHAPE, tie_word_embeddings=True, max_position_embeddings=64)
    if family == "qwen3":  # a head size other than hidden / heads, as Qwen3-0.6B's
        return t.Qwen3Config(**SHAPE, head_dim=32, max_position_embeddings=64)
    if family == "exaone":
        return t.ExaoneConfig(**SHAPE, rope_parameters=EXAONE_ROPE, max_position_embeddings=64)
    raise KeyError(family)


FAMILIES = ["llama3", "mistral", "qwen2", "qwen3", "exaone"]


def random_model(family: str):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_config(family_config(family)).eval()
    with torch.no_grad():  # transformers initializes biases and norms to 0 and 1
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
    made = {}

    def get(family):
        if family not in made:
            model = random_model(family)
            directory = tmp_path_factory.mktemp(family) / f"{family}-tiny"
            model.save_pretrained(directory, max_shard_size="3MB")  # sharded, with an index
            shutil.copy(TOKENIZER_JSON, directory)
            made[family] = model, directory
        return made[family]

    return get


def tokens(n: int = 40) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(4, 32768, (2, n), generator=g)


def engine_logits(ckpt, ids, vocab):
    from hcx.engine import inference, parallel

    try:
        engine, _ = inference.open_checkpoint(ckpt, tp=1, log=lambda *a: None)
        return inference.logits(engine, ids, vocab)
    finally:
        parallel.shutdown()


@pytest.fixture(scope="module")
def imported(tmp_path_factory, hf_model):
    """``imported(family)``: (model, HF dir, import dir, export dir), each made once."""
    from hcx.interop.hf import export_hf, import_hf

    made = {}

    def get(family):
        if family not in made:
            model, hf = hf_model(family)
            out = tmp_path_factory.mktemp(f"{family}-import")
            import_hf(hf, out / "imported", log=lambda *a: None)
            export_hf(out / "imported" / "checkpoint", out / "exported", log=lambda *a: None,
                      max_shard_size="2MB")
            made[family] = model, hf, out / "imported", out / "exported"
        return made[family]

    return get


@pytest.mark.parametrize("family", FAMILIES)
def test_import_gives_transformers_logits_and_export_gives_back_every_tensor(imported, family):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    model, hf, out, exported = imported(family)
    stub = yaml.safe_load((out / "recipe.yaml").read_text())["model"]
    assert stub["family"] == ("llama" if family == "llama3" else family)
    ids = tokens()
    with torch.no_grad():
        want = model(ids).logits
    got = engine_logits(out / "checkpoint", ids, model.config.vocab_size)
    assert got.shape == want.shape
    assert (got - want).abs().max().item() < 1e-4

    def read(directory):
        index = directory / "model.safetensors.index.json"
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        tensors = {}
        for f in files:
            with safe_open(str(directory / f), "pt") as st:
                tensors.update({k: st.get_tensor(k) for k in st.keys()})
        return tensors

    original, back = read(hf), read(exported)
    assert sorted(back) == sorted(original)
    for name, tensor in original.items():
        assert back[name].dtype == tensor.dtype and torch.equal(back[name], tensor), name
    config = json.loads((exported / "config.json").read_text())
    assert config["model_type"] == model.config.model_type
    vocab = config["vocab_size"]
    assert vocab == model.config.vocab_size  # megatron's padding rows are left out
    assert (exported / "generation_config.json").is_file() and (exported / "README.md").is_file()
    reloaded = AutoModelForCausalLM.from_pretrained(str(exported), dtype=torch.float32).eval()
    with torch.no_grad():
        again = reloaded(ids).logits[..., :vocab]
    assert (again - want).abs().max().item() < 1e-5


def test_llama3_rope_scaling_matters_past_the_original_context(imported):
    """The scaled model's logits differ from an unscaled one's past the original context,
    so the test above would fail without the scaling (and with megatron's fixed 8192)."""
    import transformers as t

    model, _, _, _ = imported("llama3")
    unscaled = t.LlamaForCausalLM(t.LlamaConfig(**{**model.config.to_dict(),
                                                   "rope_parameters": {"rope_type": "default",
                                                                       "rope_theta": 10000.0}}))
    unscaled.load_state_dict(model.state_dict())
    ids = tokens()
    with torch.no_grad():
        a, b = model(ids).logits, unscaled.eval()(ids).logits
    # 10 times the tolerance the engine is held to, past the original context of 16
    assert (a - b)[:, 16:].abs().max().item() > 1e-3


def test_exaone_original_config_names_read_the_same():
    from hcx.interop.families import model_from_hf

    canonical = family_config("exaone").to_dict()
    original = {k: v for k, v in canonical.items()
                if k not in ("num_hidden_layers", "rms_norm_eps", "hidden_act")}
    original.update(num_layers=2, layer_norm_epsilon=1e-5, activation_function="silu")
    assert model_from_hf(original) == model_from_hf(canonical)
    with pytest.raises(Exception, match=re.escape("activation_function='gelu' is not supported")):
        model_from_hf({**original, "activation_function": "gelu"})


def test_export_writes_exaone_original_names(imported):
    _, _, _, exported = imported("exaone")
    config = json.loads((exported / "config.json").read_text())
    assert config["architectures"] == ["ExaoneForCausalLM"]
    assert config["num_layers"] == 2 and "num_hidden_layers" not in config
    weight_map = json.loads((exported / "model.safetensors.index.json").read_text())["weight_map"]
    assert "transformer.h.1.attn.attention.out_proj.weight" in weight_map


@pytest.mark.slow
def test_import_at_tp2_gives_transformers_logits(tmp_path, imported):
    """Qwen3 at TP=2: each rank holds half the heads, each normalized by the shared
    QK-norm weights, and a head size other than hidden / heads."""
    model, _, out, _ = imported("qwen3")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"base": str(out / "recipe.yaml"), "data": {
        "sources": [{"name": "unused", "prefix": str(tmp_path / "unused")}]}}))
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                    "tests/workers/logits.py", str(recipe), str(out / "checkpoint"),
                    str(tmp_path / "logits.pt"), "parallel.tp=2"],
                   cwd=ROOT, check=True, capture_output=True)
    from hcx.tokenizer.loading import load_tokenizer
    from hcx.config import load_recipe

    tok = load_tokenizer(load_recipe(recipe).data.tokenizer)
    text = ["안녕하세요, 한국어와 English를 함께 배우는 모델입니다.", "The quick brown fox 여우"]
    ids = [tok.encode(t)[:32] for t in text]
    batch = torch.tensor([i + [tok.pad] * (32 - len(i)) for i in ids])
    with torch.no_grad():
        want = model(batch).logits[..., :tok.vocab_size]
    got = torch.load(tmp_path / "logits.pt")
    assert (got - want).abs().max().item() < 1e-4


# --- streaming and sharding ---------------------------------------------------------


def live_tensor_bytes() -> int:
    """Bytes of every tensor storage alive in this process (each storage once)."""
    seen, total = set(), 0
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor) and not obj.is_meta:
            storage = obj.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
    return total


@pytest.fixture(scope="module")
def deep_import(tmp_path_factory):
    """A 12-layer Llama whose layers outweigh its embeddings (a 300-word vocabulary)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM

    from hcx.interop.hf import import_hf

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=128, intermediate_size=512, num_hidden_layers=12,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=300,
                         max_position_embeddings=64, bos_token_id=1, eos_token_id=2,
                         pad_token_id=0)
    d = tmp_path_factory.mktemp("deep")
    LlamaForCausalLM(config).save_pretrained(d / "hf")
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{f"w{i}": i for i in range(4, 300)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(d / "hf" / "tokenizer.json"))
    import_hf(d / "hf", d / "imported", log=lambda *a: None)
    return d


def test_streaming_export_holds_one_part_at_a_time(tmp_path, deep_import):
    from hcx.interop.hf import export_hf

    ckpt = deep_import / "imported" / "checkpoint"
    layer = (128 * (128 + 2 * 64) + 128 * 128 + 3 * 128 * 512 + 2 * 128) * 4  # fp32 bytes
    model_bytes = 12 * layer + 2 * 384 * 128 * 4 + 128 * 4
    gc.collect()
    baseline = live_tensor_bytes()
    held = {}
    print(f"layer {layer:,} bytes, model {model_bytes:,} bytes")
    export_hf(ckpt, tmp_path / "hf", log=lambda *a: None, max_shard_size="2MB",
              observe=lambda part: held.__setitem__(part, live_tensor_bytes() - baseline))
    print("live tensor bytes per part:", held)
    assert len(held) == 12 + 3
    assert held["layer 5"] >= layer  # the measurement sees the layer being written
    # one layer (its HF tensors, about to be written) and small change, never the model
    assert max(held.values()) < layer + 200_000 < model_bytes / 10
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and all((tmp_path / "hf" / f).stat().st_size <= 2_000_000
                                  for f in files)
    assert files[0] == f"model-00001-of-{len(files):05d}.safetensors"


def test_one_file_when_the_weights_fit(tmp_path, imported):
    from hcx.interop.hf import export_hf

    _, _, out, _ = imported("qwen2")
    export_hf(out / "checkpoint", tmp_path / "hf", log=lambda *a: None)  # 5GB shards
    assert (tmp_path / "hf" / "model.safetensors").is_file()
    assert not (tmp_path / "hf" / "model.safetensors.index.json").exists()


def test_import_errors_name_the_shard_and_the_tensor(tmp_path, hf_model):
    from hcx.interop.hf import InteropError, import_hf

    _, hf = hf_model("qwen3")
    broken = tmp_path / "qwen3"
    shutil.copytree(hf, broken)
    index_file = broken / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    shard = sorted(set(index["weight_map"].values()))[-1]
    (broken / shard).unlink()
    with pytest.raises(InteropError, match=re.escape(f"names {shard}, which does not exist")):
        import_hf(broken, tmp_path / "out")
    shutil.copy(hf / shard, broken / shard)
    name = "model.layers.1.self_attn.q_norm.weight"
    other = next(f for f in sorted(set(index["weight_map"].values()))
                 if f != index["weight_map"][name])
    index["weight_map"][name] = other
    index_file.write_text(json.dumps(index))
    with pytest.raises(InteropError, match=re.escape(
            f"{broken / other}: tensor {name} is missing (the index places it in this file)")):
        import_hf(broken, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("change, refused", [
    ({"model_type": "gemma2"}, "model_type='gemma2'"),
    ({"model_type": "qwen2", "use_sliding_window": True}, "use_sliding_window=True"),
    ({"model_type": "qwen3", "layer_types": ["full_attention", "sliding_attention"]},
     "layer_types=['sliding_attention']"),
    ({"model_type": "qwen3", "attention_bias": True}, "attention_bias=True"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling.rope_type='yarn'"),
    ({"partial_rotary_factor": 0.5}, "partial_rotary_factor=0.5"),
])
def test_what_the_engine_cannot_compute_is_refused_naming_the_key(change, refused):
    from hcx.interop.hf import InteropError, model_from_hf

    base = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 176,
            "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 300}
    with pytest.raises(InteropError, match=re.escape(f"config.json: {refused} is not supported")):
        model_from_hf({**base, **change})


def test_export_refuses_what_the_family_cannot_express(tmp_path, imported):
    from hcx.config import ModelConfig
    from hcx.interop.families import InteropError, export_family

    m = ModelConfig(num_layers=2, hidden_size=64, ffn_hidden_size=176, num_attention_heads=4)
    assert export_family(m).model_type == "llama"
    with pytest.raises(InteropError, match=re.escape("model.qkv_bias=true cannot be exported as "
                                                     "model.family=hcx (exported as llama)")):
        export_family(m.model_copy(update={"qkv_bias": True}))
    with pytest.raises(InteropError, match="model.qk_norm=false cannot be exported as "
                                           "model.family=qwen3"):
        export_family(m.model_copy(update={"family": "qwen3"}))


def test_push_to_hub_is_refused_when_the_hub_is_unreachable(tmp_path, monkeypatch, imported):
    """Offline mode, or an endpoint nobody answers at (a closed local port): refused
    before the export, naming why. Nothing goes to the network."""
    from hcx.interop.hf import export_hf
    from hcx.interop.hub import HubError

    _, _, out, _ = imported("qwen2")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HubError, match="HF_HUB_OFFLINE is set"):
        export_hf(out / "checkpoint", tmp_path / "hf", push_to_hub="someone/tiny")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    with pytest.raises(HubError, match=re.escape("the Hub at http://127.0.0.1:9 is not reachable")):
        export_hf(out / "checkpoint", tmp_path / "hf", push_to_hub="someone/tiny")
    assert not (tmp_path / "hf").exists()


def test_a_bad_shard_size_is_named(tmp_path, imported):
    from hcx.interop.hf import export_hf
    from hcx.interop.safetensors_out import ShardError

    _, _, out, _ = imported("qwen2")
    with pytest.raises(ShardError, match=re.escape("--max-shard-size '5 parsecs'")):
        export_hf(out / "checkpoint", tmp_path / "hf", max_shard_size="5 parsecs")


def test_model_card_carries_the_eval_runs_scores(tmp_path, imported):
    from hcx.interop.hf import export_hf

    _, _, out, _ = imported("qwen2")
    run = tmp_path / "eval"
    run.mkdir()
    (run / "scores.json").write_text(json.dumps({"created": "2026-12-03T00:00:00Z", "tasks": {
        "kobest_boolq": {"primary": "acc", "metrics": {"acc": {"value": 0.625, "stderr": 0.02},
                                                       "acc_norm": {"value": 0.5}}},
        "gsm8k": {"primary": "exact_match", "metrics": {"exact_match": {"value": None}}}}}))
    export_hf(out / "checkpoint", tmp_path / "hf", log=lambda *a: None, eval_run=run)
    card = (tmp_path / "hf" / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    (entry,) = front["model-index"]
    assert entry["results"] == [{"task": {"type": "text-generation"},
                                 "dataset": {"name": "kobest_boolq", "type": "kobest_boolq"},
                                 "metrics": [{"type": "acc", "name": "acc", "value": 0.625},
                                             {"type": "acc_norm", "name": "acc_norm",
                                              "value": 0.5}]}]
    assert "| kobest_boolq | acc | 0.6250 |" in card and "| gsm8k | exact_match | n/a |" in card
    assert "Qwen2ForCausalLM" in card and "## Recipe" in card
    with pytest.raises(Exception, match=re.escape(f"--eval {tmp_path}: not an 'hcx eval' run")):
        export_hf(out / "checkpoint", tmp_path / "hf2", eval_run=tmp_path)
