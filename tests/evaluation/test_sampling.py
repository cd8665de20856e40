"""Sampled generation (generation.samples, temperature, top_p; --samples ...): maj@k for
answer tasks and the unbiased pass@k for code tasks, against hand-computed values;
seeded sampling in the Hugging Face model (a tiny random one built here), greedy
unchanged."""

from __future__ import annotations

import math

import pytest

from hcx.evaluation import kinds
from hcx.evaluation import tasks as T
from hcx.evaluation.metrics import (MetricError, maj_at_k, majority_vote,
                                    pass_at_k_over_problems)
from tests.evaluation.test_tasks import Scripted, write_task


class Sampler(Scripted):
    """Answers from a table keyed by (prompt, sample number), the sample number read
    back from the request's seed (generation.seed + doc * k + sample)."""

    def __init__(self, table, k, seed=1234):
        super().__init__()
        self.table, self.k, self.seed, self.requests = table, k, seed, []

    def generate(self, requests, desc="generate"):
        self.requests += requests
        return [self.table[r.prompt][(r.seed - self.seed) % self.k] for r in requests]


# --- the metrics by hand -------------------------------------------------------------


def test_majority_vote_ties_and_missing_answers():
    assert majority_vote(["2", "3", "2", None]) == "2"
    assert majority_vote(["5", "6", "5", "6"]) == "5"  # tie: the one seen first
    assert majority_vote(["6", "5", "5", "6"]) == "6"
    assert majority_vote([None, None, "7"]) == "7"  # no answer does not vote
    assert majority_vote([None, None]) is None


def test_maj_at_k_hand_values():
    # problem 1 (gold 2): votes 2,3,2,- -> 2 right; problem 2 (gold 6): 5,6,5,6 tie -> 5 wrong
    # maj@4 = 1/2, stderr std([1, 0], ddof=1) / sqrt(2) = 0.70711 / 1.41421 = 0.5
    answers = [["2", "3", "2", None], ["5", "6", "5", "6"]]
    v = maj_at_k(answers, ["2", "6"], 4)
    assert (v.value, v.stderr) == (0.5, pytest.approx(0.5))
    # maj@1 = first samples: 2 (right), 5 (wrong)
    assert maj_at_k(answers, ["2", "6"], 1).value == 0.5
    # maj@3: 2,3,2 -> 2 right; 5,6,5 -> 5 wrong
    assert maj_at_k(answers, ["2", "5"], 3).value == 1.0
    with pytest.raises(MetricError, match="maj@5 needs at least 5"):
        maj_at_k(answers, ["2", "6"], 5)


def test_pass_at_k_over_problems_hand_values():
    # (n, c) = (5, 2), (5, 0), (5, 5): pass@1 per problem 2/5, 0, 1 -> mean 1.4/3 = 0.466667;
    # deviations -0.066667, -0.466667, 0.533333; squares sum 0.506667; / 2 = 0.253333;
    # sqrt 0.503322; / sqrt(3) = 0.290593
    v = pass_at_k_over_problems([(5, 2), (5, 0), (5, 5)], 1)
    assert v.value == pytest.approx(1.4 / 3) and v.stderr == pytest.approx(0.290593, abs=1e-6)
    # pass@2: 1 - C(3,2)/C(5,2) = 0.7, 0, 1 -> 1.7 / 3
    assert pass_at_k_over_problems([(5, 2), (5, 0), (5, 5)], 2).value == pytest.approx(1.7 / 3)
    # pass@10 from 20 samples, 3 passing: 1 - C(17,10)/C(20,10) = 1 - 19448/184756 = 0.894737
    assert pass_at_k_over_problems([(20, 3)], 10).value == pytest.approx(1 - 19448 / 184756)
    assert math.comb(17, 10) == 19448 and math.comb(20, 10) == 184756


# --- the kinds with samples ------------------------------------------------------------


def _gsm8k(tmp_path, **generation):
    return write_task(tmp_path, {"name": "math", "kind": "generation", "prompt": "Q: {{ q }}\nA:",
                                 "target": "answer", "answer": "gsm8k",
                                 "metrics": ["exact_match", "exact_match_flexible"],
                                 "generation": generation},
                      [{"q": "1+1", "answer": "#### 2"}, {"q": "2*3", "answer": "#### 6"}])


def test_gsm8k_maj_at_k_by_hand(tmp_path):
    """4 samples each. Problem 1: #### 2, #### 3, #### 2, no answer -> vote 2, right;
    per-sample exact match 2/4. Problem 2: 5, 6, 5, 6 -> tie, 5 (seen first), wrong;
    exact match 2/4. maj@4 = 0.5 (stderr 0.5), exact_match = 0.5 (stderr 0)."""
    task = _gsm8k(tmp_path, samples=4, temperature=0.7, top_p=0.95)
    table = {"Q: 1+1\nA:": [" #### 2", " #### 3", " #### 2", " no idea"],
             "Q: 2*3\nA:": [" #### 5", " #### 6", " #### 5", " #### 6"]}
    model = Sampler(table, 4)
    out = kinds.run(task, T.load_docs(task), model)
    assert out.metrics["maj@4"].value == 0.5 and out.metrics["maj@4"].stderr == pytest.approx(0.5)
    assert out.metrics["exact_match"].value == 0.5 and out.metrics["exact_match"].stderr == 0.0
    assert [s["maj@4_answer"] for s in out.samples] == ["2", "5"]
    assert out.samples[0]["answers"] == ["2", "3", "2", None]
    # every request carries the sampling settings and its own seed
    assert {(r.temperature, r.top_p) for r in model.requests} == {(0.7, 0.95)}
    assert sorted(r.seed for r in model.requests) == list(range(1234, 1242))


def test_flags_override_sampling_and_maj_at_8(tmp_path):
    """--samples 8 --temperature 0.6 on a greedy task: maj@8 is reported; greedy by
    default otherwise (the same task object, nothing sampled)."""
    task = _gsm8k(tmp_path)
    assert T.with_settings(task) is task and task.spec.generation.samples == 1
    sampled = T.with_settings(task, samples=8, temperature=0.6)
    assert sampled.fingerprint != task.fingerprint
    table = {"Q: 1+1\nA:": [" #### 2"] * 5 + [" #### 1"] * 3, "Q: 2*3\nA:": [" #### 1"] * 8}
    out = kinds.run(sampled, T.load_docs(sampled), Sampler(table, 8))
    assert out.metrics["maj@8"].value == 0.5
    assert out.metrics["exact_match"].value == pytest.approx((5 / 8 + 0) / 2)
    with pytest.raises(T.TaskError, match=r"task math .*temperature > 0"):
        T.with_settings(task, samples=4)
    greedy = kinds.run(task, T.load_docs(task), Sampler(table, 1))
    assert "maj@1" not in greedy.metrics and greedy.metrics["exact_match"].value == 0.5


def test_listed_maj_needs_samples(tmp_path):
    with pytest.raises(T.TaskError, match=r"maj.yaml.*maj@8 needs generation.samples >= 8"):
        write_task(tmp_path, {"name": "maj", "kind": "generation", "prompt": "q", "target": "a",
                              "metrics": ["exact_match", "maj@8"],
                              "generation": {"samples": 4, "temperature": 1.0}}, [{"a": "x"}])


def test_code_pass_at_k_with_samples(tmp_path):
    """3 samples each: add passes 2 of 3, sub none. pass@1 = (2/3 + 0)/2 = 1/3;
    pass@2 = ((1 - C(1,2)/C(3,2)) + 0)/2 = (1 + 0)/2 = 0.5; pass@10 needs 10 samples:
    not reported."""
    docs = [{"p": "def add(a, b):\n", "t": "assert add(2, 3) == 5"},
            {"p": "def sub(a, b):\n", "t": "assert sub(2, 3) == -1"}]
    task = write_task(tmp_path, {"name": "code", "kind": "code", "prompt": "{{ p }}",
                                 "code": {"program": "{{ p }}{{ completion }}\n{{ t }}\n", "timeout_s": 5},
                                 "generation": {"samples": 3, "temperature": 0.8},
                                 "metrics": ["pass@1", "pass@2"]}, docs)
    table = {"def add(a, b):\n": ["    return a + b\n", "    return a - b\n", "    return b + a\n"],
             "def sub(a, b):\n": ["    return a + b\n", "    return b - a\n", "    pass\n"]}
    out = kinds.run(task, T.load_docs(task), Sampler(table, 3))
    assert set(out.metrics) == {"pass@1", "pass@2"}
    assert out.metrics["pass@1"].value == pytest.approx(1 / 3)
    assert out.metrics["pass@2"].value == pytest.approx(0.5)
    assert [s["n_passed"] for s in out.samples] == [2, 0]
    assert out.samples[0]["statuses"] == ["passed", "failed", "passed"]


def test_sampling_refused_where_it_means_nothing(tmp_path):
    docs = [{"ko": "문장", "en": "A sentence."}]
    task = write_task(tmp_path, {"name": "tr", "kind": "translation", "language": "ko-en",
                                 "prompt": "{{ ko }} =", "target": "en", "metrics": ["chrf"],
                                 "generation": {"samples": 2, "temperature": 1.0}}, docs)
    with pytest.raises(T.TaskError, match="task tr: generation.samples > 1 is for generation and code"):
        kinds.run(task, T.load_docs(task), Scripted())
    # the flags leave translation tasks alone
    plain = write_task(tmp_path, {"name": "tr2", "kind": "translation", "language": "ko-en",
                                  "prompt": "{{ ko }} =", "target": "en", "metrics": ["chrf"]}, docs)
    assert T.with_settings(plain, samples=4, temperature=1.0) is plain


# --- the Hugging Face model samples from a seed ------------------------------------------


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    """A randomly initialised 2-layer Llama with a byte-level tokenizer (no training)."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    out = tmp_path_factory.mktemp("tiny-hf")
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {c: i for i, c in enumerate(sorted(alphabet))}
    vocab["<eos>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")
    fast.save_pretrained(out)
    import torch

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=2,
                                   max_position_embeddings=128, eos_token_id=len(vocab) - 1)
    transformers.LlamaForCausalLM(cfg).save_pretrained(out)
    return out


def test_hf_sampled_generation_is_seeded_and_greedy_unchanged(tiny_hf):
    import torch

    from hcx.evaluation.models import GenerationRequest, HFModel

    model = HFModel(str(tiny_hf), device="cpu")
    greedy = [GenerationRequest("Hello", 12), GenerationRequest("안녕", 12)]
    first = model.generate(greedy)
    torch.manual_seed(99)  # the global generator does not matter to greedy decoding...
    assert model.generate(greedy) == first

    def sampled(seed):
        return model.generate([GenerationRequest("Hello", 8, temperature=1.0, top_p=0.9, seed=seed),
                               GenerationRequest("안녕", 8, temperature=1.0, top_p=0.9, seed=seed)])

    state = torch.random.get_rng_state()
    a = sampled(5)
    assert torch.equal(torch.random.get_rng_state(), state)  # ...nor is it changed by sampling
    assert sampled(5) == a  # same seed, same texts
    assert len({tuple(sampled(s)) for s in range(1, 4)} | {tuple(a)}) > 1  # seeds differ


def test_korquad_maj_at_k_votes_over_normalised_answers(tmp_path):
    """KorQuAD answers vote after KorQuAD's normalisation: " 서울", " 서울특별시",
    " 《서울》" -> 서울, 서울특별시, 서울 -> 서울, right (maj@3 = 1); the second question's
    부산, 대구, 광주 tie -> 부산 (first), wrong against 대구: maj@3 = 1/2."""
    task = write_task(tmp_path, {"name": "qa", "kind": "generation", "prompt": "{{ q }}",
                                 "target": "answers", "answer": "korquad", "metrics": ["exact_match"],
                                 "generation": {"samples": 3, "temperature": 1.0, "stop": ["\n"]}},
                      [{"q": "a", "answers": ["서울"]}, {"q": "b", "answers": ["대구"]}])
    table = {"a": [" 서울", " 서울특별시", " 《서울》"], "b": [" 부산", " 대구", " 광주"]}
    out = kinds.run(task, T.load_docs(task), Sampler(table, 3))
    assert out.metrics["maj@3"].value == 0.5
    assert [s["maj@3_answer"] for s in out.samples] == ["서울", "부산"]
    # exact match per sample: a 2/3, b 1/3 -> 1/2
    assert out.metrics["exact_match"].value == pytest.approx(0.5)
