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
