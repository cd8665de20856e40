"""Loss, FLOPs, parameter counts, data files and the batch sampler against hand values."""

import numpy as np
import pytest
import torch

from hcx.config import ModelConfig
from hcx.data.indexed import DataError, read_texts, write_indexed_dataset
from hcx.engine.metrics import peak_tflops, training_flops_per_token
from hcx.engine.model import count_parameters, padded_vocab_size
from hcx.tokenizer.loading import ByteTokenizer
from hcx.stages.pretrain import lm_loss, microbatches

SMALL = ModelConfig(num_layers=2, hidden_size=64, ffn_hidden_size=176, num_attention_heads=4,
                    num_query_groups=2)


def test_lm_loss_masked_sum_and_count():
    per_token = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    mask = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    loss_sum, n, report = lm_loss(mask, per_token)
    assert loss_sum.item() == 8.0 and n.item() == 3  # 1 + 3 + 4 over 3 tokens
    assert report["loss"].tolist() == [8.0, 3.0]
    loss_sum /= n  # what megatron's schedule does in place must not touch the report
    assert report["loss"].tolist() == [8.0, 3.0]


def test_training_flops_hand_computed():
    # head_dim 16, kv width 2*16 = 32. Per layer matmul weights:
    #   QKV 64*(64+2*32) = 8192, out 64*64 = 4096, SwiGLU 3*64*176 = 33792 -> 46080; x2 layers = 92160
    # forward/token = 2*92160 + 4*L*s*h (4*2*64*64 = 32768) + 2*h*V (2*64*384 = 49152) = 266240
    assert training_flops_per_token(SMALL, vocab_size=384, seq_length=64) == 3 * 266240


def test_peak_tflops_configured_wins():
    assert peak_tflops(0.2, torch.float32) == 0.2
    if not torch.cuda.is_available():
        assert peak_tflops(None, torch.float32) is None


def test_padded_vocab_is_tp_independent():
    assert padded_vocab_size(259, 1) == padded_vocab_size(259, 2) == padded_vocab_size(259, 8) == 384
    assert padded_vocab_size(384, 1) == 384
    assert padded_vocab_size(259, 3) == 384  # lcm(128, 3) = 384


def test_parameter_count_hand_computed():
    c = count_parameters(SMALL, vocab_size=384)
    # per layer: 46080 matmul + 2*64 norms = 46208; 2 layers + final norm 64 = 92480
    assert c["non_embedding"] == 92480
    assert c["total"] == 92480 + 2 * 384 * 64  # untied input and output embeddings
    tied = count_parameters(SMALL.model_copy(update={"tie_embeddings": True}), vocab_size=384)
    assert tied["total"] == 92480 + 384 * 64


def test_parameter_count_matches_megatron_model():
    from hcx.engine import parallel
    from hcx.config import ParallelConfig
    from hcx.engine.model import build_gpt

    parallel.initialize(ParallelConfig(), seed=1)
    try:
        variants = [{"tie_embeddings": False}, {"tie_embeddings": True},
                    # the open families' options (hcx import): Qwen2's, Qwen3's
                    {"qkv_bias": True}, {"qk_norm": True, "head_dim": 32}]
        for update in variants:
            cfg = SMALL.model_copy(update=update)
            model = build_gpt(cfg, ParallelConfig(), 384, 64, torch.float32, True, True)
            n = sum(p.numel() for p in model.parameters())
            assert n == count_parameters(cfg, 384)["total"]
    finally:
        parallel.shutdown()


def test_byte_tokenizer_roundtrip_korean():
    tok = ByteTokenizer()
    text = "한국어 English 🙂"
    assert tok.decode(tok.encode(text)) == text
    assert max(tok.encode(text)) < 256 and tok.eod == 257


def test_read_texts_errors_name_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": broken\n')
    with pytest.raises(DataError, match=rf"{bad}:2: malformed JSON"):
        list(read_texts(bad, "text"))
    bad.write_text('{"text": "ok"}\n{"body": "x"}\n')
    with pytest.raises(DataError, match=rf"{bad}:2: no field 'text' \(has \['body'\]\)"):
        list(read_texts(bad, "text"))
    bad.write_bytes(b'{"text": "ok"}\n{"text": "\xff\xfe"}\n')
    with pytest.raises(DataError, match=rf"{bad}:2: invalid UTF-8"):
        list(read_texts(bad, "text"))
    with pytest.raises(DataError, match="file not found"):
        list(read_texts(tmp_path / "missing.jsonl", "text"))


def test_write_indexed_dataset_roundtrip_and_atomicity(tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    docs = [[1, 2, 3], [], [4, 5], [258, 7, 257]]
    prefix = tmp_path / "ds"
    assert write_indexed_dataset(iter(docs), prefix, vocab_size=259) == 3
    ds = IndexedDataset(str(prefix))
    assert [ds[i].tolist() for i in range(len(ds))] == [[1, 2, 3], [4, 5], [258, 7, 257]]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds.bin", "ds.idx"]  # no temp files
    with pytest.raises(DataError, match="no non-empty documents"):
        write_indexed_dataset(iter([[], []]), tmp_path / "empty", vocab_size=259)
    assert not list(tmp_path.glob("empty*"))


def test_microbatches_same_global_batch_for_any_dp():
    dataset = [{k: np.full(4, i) for k in ("tokens", "labels", "loss_mask", "position_ids")}
               for i in range(100)]

    def samples(dp):
        seen = []
        for rank in range(dp):
            for mb in microbatches(dataset, first_sample=24, global_batch=8, micro_batch=2, dp=dp, dp_rank=rank):
                seen += mb["tokens"][:, 0].tolist()
        return sorted(seen)

    assert samples(1) == samples(2) == samples(4) == list(range(24, 32))
    mbs = microbatches(dataset, first_sample=0, global_batch=8, micro_batch=2, dp=2, dp_rank=1)
    assert [mb["tokens"][:, 0].tolist() for mb in mbs] == [[2, 3], [6, 7]]


def test_empty_split_is_an_error_not_a_hang(tmp_path, prepared_prefix):
    # megatron-core 0.16 loops forever building a split with no documents.
    from tests.conftest import hcx, small_recipe

    recipe = small_recipe(tmp_path / "r.yaml", tmp_path / "run", prepared_prefix)
    proc = hcx("pretrain", str(recipe), "data.split=98,2,0", check=False, timeout=120)
    assert proc.returncode == 1
    assert "data source 'ko_kolaw' has 12 documents" in proc.stderr
    assert "leaves none for its validation split" in proc.stderr


def test_pad_equal_to_eod_does_not_mask_document_ends(tmp_path, prepared_prefix):
    """A tokenizer without a pad token reports pad == eod: end-of-document targets must
    still be trained (megatron 0.16 treats such an ambiguous pad as absent)."""
    from hcx.config import load_recipe
    from hcx.data.indexed import build_datasets
    from tests.conftest import small_recipe

    recipe = load_recipe(small_recipe(tmp_path / "r.yaml", tmp_path / "run", prepared_prefix),
                         ["data.sources.1.weight=0.001", "train.steps=400"])  # cross several documents
    from hcx.engine import parallel

    tok = ByteTokenizer(pad=257)  # pad == eod == 257
    parallel.initialize(recipe.parallel, seed=1)  # megatron's builder expects a process group
    try:
        ds = build_datasets(recipe, [str(prepared_prefix), str(prepared_prefix)], tok).train
    finally:
        parallel.shutdown()
    hits = 0
    for i in range(len(ds)):
        sample = ds[i]
        at_eod = np.asarray(sample["labels"]) == 257
        hits += int(at_eod.sum())
        assert np.all(np.asarray(sample["loss_mask"])[at_eod] == 1.0)
    assert hits > 0


def test_write_text_atomic_replaces_whole_files_with_usual_permissions(tmp_path):
    import os

    from hcx.files import write_text_atomic

    target = tmp_path / "scores.json"
    write_text_atomic(target, "old\n")
    mask = os.umask(0o022)
    os.umask(mask)
    assert target.read_text() == "old\n" and target.stat().st_mode & 0o777 == 0o666 & ~mask
    script = write_text_atomic(tmp_path / "job.sh", "#!/bin/sh\n", mode=0o755)
    assert script.stat().st_mode & 0o777 == 0o755
    with pytest.raises(TypeError):  # the write fails half-way: the old file stays whole
        write_text_atomic(target, b"not text")  # type: ignore[arg-type]
    assert target.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["job.sh", "scores.json"]
