"""hcx import --tokenizer EXTENDED: the embedding and output layer grow to the extended
tokenizer, each new row the mean of the model's rows of the token's base pieces."""

import shutil

import torch
import yaml

from tests.conftest import data_root, hcx


def test_import_with_an_extended_tokenizer_initialises_new_rows_as_means(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from hcx.data.tokenizer_extend import extend
    from hcx.interop.vocab import base_pieces, plan_extension
    from tests.engine.test_trainable import weights

    spm = data_root() / "tokenizers/mistral/tokenizer.model.v1"
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, vocab_size=32000,
                         max_position_embeddings=64, tie_word_embeddings=False,
                         bos_token_id=1, eos_token_id=2)
    hf = tmp_path / "tiny-mistral-vocab"
    model = LlamaForCausalLM(config)
    model.save_pretrained(hf)
    shutil.copy(spm, hf / "tokenizer.model")
    ext = extend(str(hf), ["data://train/pretrain/ko_nsmc_reviews/train.jsonl"], 60,
                 tmp_path / "ext", sample_chars=100_000, log=lambda *_: None)

    out = tmp_path / "imported"
    proc = hcx("import", str(hf), str(out), "--tokenizer", str(ext))
    assert "60 new token rows" in proc.stderr
    stub = yaml.safe_load((out / "recipe.yaml").read_text())
    assert stub["model"]["vocab_size"] == 32060 and stub["train"]["new_tokens_from"] == 32000
    assert (out / "tokenizer" / "tokenizer.json").is_file()

    got = weights(out / "checkpoint")
    pieces = base_pieces(plan_extension(hf, 32000, ext))
    for name, hf_name in (("embedding.word_embeddings.weight", "model.embed_tokens.weight"),
                          ("output_layer.weight", "lm_head.weight")):
        want = model.state_dict()[hf_name]
        rows = got[name]
        assert rows.shape[0] == 32128  # 32060 padded to a multiple of 128
        assert torch.equal(rows[:32000], want)
        means = torch.stack([want[ids].mean(0) for ids in pieces])
        assert torch.allclose(rows[32000:32060], means, atol=1e-6)
        assert torch.equal(rows[32060:], torch.zeros(68, 32))

    # EEVE's first stage from the command line: continue pretraining on Korean text with
    # only the new rows training, then export a Hugging Face directory of the grown model.
    recipe = tmp_path / "continue.yaml"
    recipe.write_text(yaml.safe_dump({
        "base": str(out / "recipe.yaml"), "name": "continue", "output_dir": str(tmp_path / "run"),
        "data": {"seq_length": 32, "eval_every": 0, "split": "100,0,0",
                 "prepare": {"workers": 1, "decontaminate": None},
                 "sources": [{"name": "ko", "path": "data://train/pretrain/ko_nsmc_reviews/train.jsonl"}]},
        "train": {"steps": 2, "global_batch_size": 2, "micro_batch_size": 1, "warmup_steps": 0,
                  "trainable": "new_embeddings"},
        "checkpoint": {"save_every": 0}, "logging": {"progress": False}}))
    hcx("pretrain", str(recipe))
    trained = weights(tmp_path / "run" / "checkpoints" / "step_00000002")
    for name in ("embedding.word_embeddings.weight", "output_layer.weight"):
        assert torch.equal(trained[name][:32000], got[name][:32000])  # old rows frozen
        assert not torch.equal(trained[name][32000:32060], got[name][32000:32060])
    assert all(torch.equal(trained[k], v) for k, v in got.items()
               if k not in ("embedding.word_embeddings.weight", "output_layer.weight"))
    hcx("export", str(tmp_path / "run" / "checkpoints"), str(tmp_path / "hf-out"))
    exported = LlamaForCausalLM.from_pretrained(tmp_path / "hf-out")
    assert exported.config.vocab_size == 32060
