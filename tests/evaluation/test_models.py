"""The evaluation models on a real (tiny) checkpoint: hcx and its Hugging Face export
score and generate alike, the shared-context scoring equals a plain forward pass, and
``hcx eval`` / ``hcx report`` run from the command line on both, at TP=1 and TP=2."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import hcx

pytestmark = pytest.mark.slow

QUESTIONS = [("대한민국의 수도는", [" 서울", " 부산입니다 정말로", " 도쿄"]),
             ("The capital of France is", [" Paris", " a city in Europe", " Rome"]),
             ("짧은", [" 문장", "이다"])]


@pytest.fixture(scope="module")
def hf_dir(sft_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("hf") / "sft-hf"
    hcx("export", str(sft_checkpoint), str(out))
    return out


def _requests(model):
    from hcx.evaluation.models import ChoiceRequest, encode_choices

    return [ChoiceRequest(*encode_choices(model.encode, context, conts, model.eot_id))
            for context, conts in QUESTIONS]


def test_shared_context_scores_equal_full_forward_and_hf(sft_checkpoint, hf_dir):
    """One context pass plus cached continuations gives the log-likelihoods of scoring
    each context+continuation from scratch, and the exported HF model gives the same."""
    from hcx.evaluation.models import GenerationRequest, HcxModel, HFModel
    from hcx.engine.inference import logits

    model = HcxModel(str(sft_checkpoint), log=lambda *a: None)
    try:
        reqs = _requests(model)
        got = model.loglikelihood(reqs)
        for r, scores in zip(reqs, got):
            for cont, s in zip(r.continuations, scores):
                tokens = torch.tensor([r.context + cont])
                lp = torch.log_softmax(logits(model.engine, tokens[:, :-1], model.vocab)[0], -1)
                full = sum(float(lp[len(r.context) - 1 + j, t]) for j, t in enumerate(cont))
                assert s.logprob == pytest.approx(full, abs=1e-4)
        conversation = [{"role": "system", "content": "짧게 답하세요."},
                        {"role": "user", "content": "수도는?"},
                        {"role": "assistant", "content": "서울입니다."},
                        {"role": "user", "content": "왜요?"}]
        prompts = [GenerationRequest("대한민국의 수도는", 12, ("\n",)), GenerationRequest("Hello", 8),
                   GenerationRequest(conversation, 8)]
        texts = model.generate(prompts)
        # a conversation is rendered with the chat layout SFT trains on
        from hcx.engine.generate import encode_prompt
        assert model.prompt_ids(prompts[2]) == encode_prompt(conversation, model.tokenizer, chat=True)
    finally:
        model.close()
    hf = HFModel(str(hf_dir))
    for ours, theirs in zip(got, hf.loglikelihood(_requests(hf))):
        assert [s.logprob for s in theirs] == pytest.approx([s.logprob for s in ours], abs=1e-4)
        assert [s.greedy for s in theirs] == [s.greedy for s in ours]
    assert hf.generate(prompts) == texts  # the export's chat template renders the same turns


def _scores(run) -> dict:
    """Every metric value; a metric without examples of its kind (a bias score on a
    6-example run) is null in scores.json, here NaN, which approx(nan_ok) compares."""
    tasks = json.loads((run / "scores.json").read_text())["tasks"]
    return {f"{t}/{m}": float("nan") if v["value"] is None else v["value"]
            for t, e in tasks.items() for m, v in e["metrics"].items()}


def test_eval_cli_on_checkpoint_and_export_at_tp1_and_tp2(sft_checkpoint, hf_dir, tmp_path):
    """The quick suite (one task of every kind) from the command line: the checkpoint, its
    TP=2 run and its HF export agree on every metric; a second run resumes; the report
    compares the runs."""
    args = ["--tasks", "quick", "--limit", "6", "--max-new-tokens", "16"]
    runs = {name: tmp_path / name for name in ("hcx", "tp2", "hf")}
    hcx("eval", str(sft_checkpoint), *args, "--out", str(runs["hcx"]))
    hcx("eval", str(sft_checkpoint), *args, "--tp", "2", "--out", str(runs["tp2"]))
    hcx("eval", str(hf_dir), *args, "--out", str(runs["hf"]))
    base = _scores(runs["hcx"])
    assert len({k.split("/")[0] for k in base}) == 9
    assert _scores(runs["tp2"]) == pytest.approx(base, nan_ok=True)
    assert _scores(runs["hf"]) == pytest.approx(base, nan_ok=True)
    meta = json.loads((runs["hcx"] / "scores.json").read_text())
    assert meta["model"]["kind"] == "hcx" and meta["model"]["step"] == 2 and meta["limit"] == 6
    samples = (runs["hcx"] / "samples" / "kobest_copa.jsonl").read_text().splitlines()
    assert len(samples) == 6 and "loglikelihoods" in json.loads(samples[0])

    again = hcx("eval", str(sft_checkpoint), *args, "--out", str(runs["hcx"]))
    assert again.stderr.count("done before, kept") == 9

    report = tmp_path / "report"
    hcx("report", str(runs["hcx"]), str(runs["hf"]), "--out", str(report))
    md = (report / "report.md").read_text()
    assert "kobest_copa" in md and "flores_en_ko" in md and "NOT comparable" in md
    assert json.loads((report / "report.json").read_text())


def test_eval_cli_errors(tmp_path, sft_checkpoint):
    bad = hcx("eval", str(sft_checkpoint), "--tasks", "kobest_cpoa", check=False)
    assert bad.returncode == 1 and "did you mean 'kobest_copa'" in bad.stderr
    missing = hcx("eval", str(tmp_path / "nothing"), "--tasks", "kobest_copa", check=False)
    assert missing.returncode == 1 and "no such checkpoint or model directory" in missing.stderr
    no_run = hcx("report", str(tmp_path), check=False)
    assert no_run.returncode == 1 and "scores.json" in no_run.stderr


def test_hcx_model_samples_from_a_seed(sft_checkpoint):
    """Sampled generation on an hcx checkpoint: the same seed gives the same texts, other
    seeds other texts, and greedy requests are unchanged by sampled ones beside them."""
    from hcx.evaluation.models import GenerationRequest, HcxModel

    model = HcxModel(str(sft_checkpoint), log=lambda *a: None)
    try:
        greedy = model.generate([GenerationRequest("대한민국의 수도는", 12)])
        sampled = [GenerationRequest("대한민국의 수도는", 12, temperature=1.0, seed=s)
                   for s in (1, 1, 2, 3)]
        first = [model.generate([r])[0] for r in sampled]
        mixed = model.generate([GenerationRequest("대한민국의 수도는", 12), sampled[0]])
    finally:
        model.close()
    assert first[0] == first[1]  # same seed, same text
    assert len(set(first[1:])) > 1  # a random 2-layer model: other seeds differ
    assert first[0] != greedy[0]
    assert mixed == [greedy[0], first[0]]


def test_eval_dp2_equals_dp1(sft_checkpoint, hf_dir, tmp_path):
    """--dp 2 (two replicas, each running every other batch of the single-process plan)
    writes exactly the samples and scores of --dp 1: log-likelihoods, greedy and sampled
    generations alike, for an hcx checkpoint and a Hugging Face directory."""
    args = ["--tasks", "kobest_copa,gsm8k", "--limit", "6", "--batch-size", "2",
            "--samples", "2", "--temperature", "1.0", "--max-new-tokens", "6"]
    for name, model in (("hcx", sft_checkpoint), ("hf", hf_dir)):
        one, two = tmp_path / f"{name}-dp1", tmp_path / f"{name}-dp2"
        hcx("eval", str(model), *args, "--out", str(one))
        hcx("eval", str(model), *args, "--dp", "2", "--out", str(two))
        for task in ("kobest_copa", "gsm8k"):
            ours = (two / "samples" / f"{task}.jsonl").read_text()
            assert ours == (one / "samples" / f"{task}.jsonl").read_text()
            assert len(ours.splitlines()) == 6
        assert _scores(two) == _scores(one)
