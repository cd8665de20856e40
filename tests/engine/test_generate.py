"""Generation: logits processing against hand-computed values and transformers, the
decoding loop against transformers' generate on the exported model, TP, the CLI."""

import json
import subprocess
import sys

import pytest
import torch

from hcx.engine.generate import (
    GenerationError,
    SamplingParams,
    apply_repetition_penalty,
    apply_top_k,
    apply_top_p,
    left_pad,
    next_tokens,
    padding_mask,
    read_prompts,
)
from tests.conftest import ROOT, hcx, small_recipe

TOKENIZER = ROOT / "tokenizer" / "hcx-ko-en-32k" / "tokenizer.model"
PROMPTS = ["To be, or not to be", "안녕하세요, 오늘은", "def fib(n):\n    return", "The"]


# --- logits processing ---------------------------------------------------------------


def test_repetition_penalty_by_hand():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0]])
    seen = torch.tensor([[True, True, False, False]])
    got = apply_repetition_penalty(logits, seen, 2.0)
    assert got.tolist() == [[1.0, -2.0, 0.5, 3.0]]


def test_top_k_and_top_p_by_hand():
    logits = torch.log(torch.tensor([[0.5, 0.2, 0.2, 0.1]]))
    assert torch.isinf(apply_top_k(logits, 1)).tolist() == [[False, True, True, True]]
    # ties with the k-th largest stay
    assert torch.isinf(apply_top_k(logits, 2)).tolist() == [[False, False, False, True]]
    # p=0.6: 0.5 alone is not enough, so one of the tied 0.2s joins it
    kept = ~torch.isinf(apply_top_p(logits, 0.6))
    assert kept[0, 0] and not kept[0, 3] and kept.sum() == 2
    kept = ~torch.isinf(apply_top_p(logits, 0.95))
    assert kept.tolist() == [[True, True, True, True]]
    kept = ~torch.isinf(apply_top_p(logits, 0.01))  # the most likely token always stays
    assert kept.tolist() == [[True, False, False, False]]


def test_processors_match_transformers():
    from transformers.generation.logits_process import (
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 50, generator=g) * 3
    input_ids = torch.randint(0, 50, (4, 7), generator=g)
    seen = torch.zeros(4, 50, dtype=torch.bool).scatter_(1, input_ids, True)
    want = RepetitionPenaltyLogitsProcessor(1.3)(input_ids, logits.clone())
    assert torch.equal(apply_repetition_penalty(logits, seen, 1.3), want)
    want = TemperatureLogitsWarper(0.7)(input_ids, logits.clone())
    for k in (1, 5, 49):
        assert torch.equal(apply_top_k(want, k), TopKLogitsWarper(k)(input_ids, want.clone()))
    for p in (0.1, 0.5, 0.9, 0.999):
        assert torch.equal(apply_top_p(want, p), TopPLogitsWarper(p)(input_ids, want.clone()))


def test_seeded_sampling_and_greedy():
    logits = torch.randn(3, 20, generator=torch.Generator().manual_seed(1))
    seen = torch.zeros(3, 20, dtype=torch.bool)
    params = SamplingParams(temperature=1.0)
    a = next_tokens(logits, seen, params, torch.Generator().manual_seed(5))
    b = next_tokens(logits, seen, params, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    assert torch.equal(next_tokens(logits, seen, SamplingParams(), None), logits.argmax(-1))
    # top-k 1 sampling is greedy
    one = SamplingParams(temperature=0.5, top_k=1)
    assert torch.equal(next_tokens(logits, seen, one, torch.Generator()), logits.argmax(-1))


def test_left_padding_and_mask_by_hand():
    tokens, real = left_pad([[5, 6, 7], [8]], pad=0)
    assert tokens.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert real.tolist() == [[True, True, True], [False, False, True]]
    masked = padding_mask(real, 3)  # True = masked (megatron's convention)
    assert masked.shape == (2, 1, 3, 3)
    assert (~masked[0, 0]).int().tolist() == [[1, 0, 0], [1, 1, 0], [1, 1, 1]]
    # padding sees only itself; the real token sees only real tokens
    assert (~masked[1, 0]).int().tolist() == [[1, 0, 0], [0, 1, 0], [0, 0, 1]]
    step = padding_mask(torch.cat([real, torch.ones(2, 1, dtype=torch.bool)], 1), 1)
    assert (~step[:, 0, 0]).int().tolist() == [[1, 1, 1, 1], [0, 0, 1, 1]]
    assert padding_mask(torch.ones(2, 3, dtype=torch.bool), 3) is None


@pytest.mark.parametrize("bad, message", [
    ({"max_new_tokens": 0}, "max_new_tokens"), ({"temperature": -1}, "temperature"),
    ({"top_p": 0}, "top_p"), ({"top_k": -2}, "top_k"), ({"repetition_penalty": 0}, "repetition"),
    ({"stop_strings": ("",)}, "stop strings"),
])
def test_sampling_params_are_checked(bad, message):
    with pytest.raises(GenerationError, match=message):
        SamplingParams(**bad)


def test_prompts_file(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('plain text\n\n{"prompt": "a"}\n{"messages": [{"role": "user", "content": "b"}]}\n',
                 encoding="utf-8")
    assert read_prompts(str(f)) == ["plain text", "a", [{"role": "user", "content": "b"}]]
    f.write_text('{"prompt": 3}\n')
    with pytest.raises(GenerationError, match=r"p.jsonl:1: expected a 'prompt'"):
        read_prompts(str(f))


# --- the model -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A randomly initialised model (wide init: distinct, confident next tokens, so
    greedy decoding is a sharp test) as an hcx checkpoint and its HF export."""
    tmp = tmp_path_factory.mktemp("generate")
    recipe = small_recipe(
        tmp / "recipe.yaml", tmp / "run", tmp / "unused",
        model={"init_std": 0.2},
        data={"tokenizer": {"kind": "sentencepiece", "path": str(TOKENIZER)},
              "sources": [{"name": "en", "weight": 1.0,
                           "path": "data://train/pretrain/en_tiny_shakespeare/train.jsonl"}]},
        train={"steps": 1, "warmup_steps": 0}, checkpoint={"save_every": 0})
    hcx("pretrain", str(recipe))
    ckpt = tmp / "run" / "checkpoints"
    hcx("export", str(ckpt), str(tmp / "hf"))
    return ckpt, tmp / "hf", tmp


@pytest.fixture(scope="module")
def cases(model):
    ckpt, _, tmp = model
    (tmp / "prompts.json").write_text(json.dumps(PROMPTS))
    subprocess.run([sys.executable, "tests/workers/generate.py", str(ckpt), str(tmp / "out.json"),
                    str(tmp / "prompts.json")], cwd=ROOT, check=True, capture_output=True)
    return json.loads((tmp / "out.json").read_text())


def hf_generate(directory, prompts, **kwargs):
    """transformers' generate on the exported model: left-padded batch, as hcx."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(directory), padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32)
    batch = tok.pad({"input_ids": prompts}, return_tensors="pt")
    # the vocabulary padding rows are not tokens; hcx never picks them
    padding = list(range(len(tok), model.config.vocab_size))
    with torch.no_grad():
        out = model.generate(**batch, do_sample=False, suppress_tokens=padding or None,
                             pad_token_id=tok.pad_token_id, **kwargs)
    eos = set(kwargs.get("eos_token_id") or [tok.eos_token_id])
    result = []
    for row in out[:, batch["input_ids"].shape[1]:].tolist():
        ids = []
        for t in row:
            ids.append(t)
            if t in eos:
                break
        result.append(ids)
    return result, tok


@pytest.mark.slow
def test_greedy_equals_transformers_generate(model, cases):
    _, hf, _ = model
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(hf))
    prompts = [tok.encode(p) for p in PROMPTS]
    want, _ = hf_generate(hf, prompts, max_new_tokens=12)
    assert cases["greedy"] == want
    assert len({tuple(x) for x in want}) == len(PROMPTS)  # a sharp test: outputs differ
    # the KV cache, the full recomputation and one prompt at a time agree
    assert cases["greedy_no_cache"] == want
    assert cases["greedy_one_by_one"] == want
    # the repetition penalty too (prompts without padding in transformers, where it
    # would count the pad token as seen)
    for prompt, got in zip(prompts, cases["penalty"]):
        one, _ = hf_generate(hf, [prompt], max_new_tokens=12, repetition_penalty=1.5)
        assert got == one[0]


@pytest.mark.slow
def test_sampling_is_seeded(cases):
    assert cases["sample_seed1"] == cases["sample_seed1_again"]
    assert cases["sample_seed1"] != cases["sample_seed2"]
    assert cases["sample_top_k1"] == cases["greedy"]


@pytest.mark.slow
def test_stop_ids_and_strings(cases):
    s = cases["stop_id"]
    first = s["ids"].index(s["id"])
    assert s["ids"] == cases["greedy"][0][:first + 1] and s["reason"] == "stop"
    s = cases["stop_string"]
    assert s["reason"] == "stop" and s["stop"] not in s["text"]
    assert s["full"].startswith(s["text"]) and s["full"][len(s["text"]):].startswith(s["stop"])
    assert len(s["ids"]) < 12


@pytest.mark.slow
def test_cli_chat_at_tp2_equals_transformers(model):
    ckpt, hf, tmp = model
    from hcx.tokenizer.special_tokens import END_OF_TURN

    question = "한국의 수도는 어디인가요? <|user|> stays text"
    proc = hcx("generate", str(ckpt), "--prompt", question, "--prompt", "Hello", "--chat",
               "--json", "--max-new-tokens", "10", "--tp", "2")
    got = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [g["prompt"] for g in got] == [question, "Hello"]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(hf))
    eos = [tok.eos_token_id, tok.convert_tokens_to_ids(END_OF_TURN)]
    from hcx.tokenizer.chat import render_chat
    from hcx.tokenizer.loading import open_tokenizer

    ours = open_tokenizer(str(TOKENIZER))
    prompts = [render_chat([{"role": "user", "content": q}], ours, add_generation_prompt=True).ids
               for q in (question, "Hello")]
    want, _ = hf_generate(hf, prompts, max_new_tokens=10, eos_token_id=eos)
    assert [g["ids"] for g in got] == want


def test_cli_without_prompts_says_so(tmp_path):
    proc = hcx("generate", str(tmp_path), check=False)
    assert proc.returncode == 1 and "no prompts" in proc.stderr
    proc = hcx("generate", str(tmp_path), "--prompt", "x", "--top-p", "2", check=False)
    assert proc.returncode == 1 and "top_p must be in (0, 1]" in proc.stderr
