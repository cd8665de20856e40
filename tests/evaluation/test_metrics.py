"""hcx.evaluation.metrics against values computed by hand (in the comments), and the
bootstrap fast paths against the slow, obvious computation."""

import math

import numpy as np
import pytest
import sacrebleu

from hcx.evaluation.metrics import (KOREAN_BLEU_TOKENIZE, BiasRecord, MetricError,
                                    MetricValue, accuracy, bias_scores, bootstrap_stderr,
                                    gsm8k_correct, gsm8k_extract, gsm8k_gold, korquad_em,
                                    korquad_f1, mc_predictions, mean_stderr,
                                    out_of_choice_ratio, pass_at_k, squad_em, squad_f1,
                                    translation_scores, translation_signature,
                                    truthfulqa_mc1, truthfulqa_mc2)

# --- standard errors -------------------------------------------------------------------


def test_mean_stderr_hand_values():
    # [1,2,3,4]: mean 2.5; squared deviations 2.25+0.25+0.25+2.25 = 5; var (ddof=1) 5/3;
    # std 1.2909944; / sqrt(4) -> 0.6454972
    mean, se = mean_stderr([1, 2, 3, 4])
    assert mean == 2.5 and se == pytest.approx(0.6454972, abs=1e-7)
    assert mean_stderr([5.0]) == (5.0, None)
    with pytest.raises(MetricError):
        mean_stderr([])


def test_accuracy_hand_values():
    # hits 1,1,0,0: mean 0.5; var (ddof=1) = 4 * 0.25 / 3 = 1/3; se = sqrt(1/3) / 2 = 0.2886751
    v = accuracy([1, 2, 3, 4], [1, 2, 0, 0])
    assert v.value == 0.5 and v.stderr == pytest.approx(0.2886751, abs=1e-7)
    with pytest.raises(MetricError, match="preds has 1 items but golds has 2"):
        accuracy([1], [1, 2])


def test_metric_value_json():
    assert MetricValue(0.5, None).to_json() == {"value": 0.5, "stderr": None,
                                                "higher_is_better": True}
    assert MetricValue(float("nan"), 0.1, False).to_json() == {"value": None, "stderr": 0.1,
                                                               "higher_is_better": False}


def test_bootstrap_stderr_close_to_analytic_for_a_mean():
    # 0/1 values, 200 ones of 400: analytic se = sqrt(400*0.25/399)/sqrt(400) = 0.0250313.
    # The bootstrap estimates the same quantity; 1000 resamples are within ~5% of it.
    values = np.array([1.0] * 200 + [0.0] * 200)
    se = bootstrap_stderr(lambda s: float(s.mean()), values)
    assert se == pytest.approx(0.0250313, rel=0.08)
    # same seed, same draws; a list gets a list
    assert se == bootstrap_stderr(lambda s: sum(s) / len(s), list(values))
    assert bootstrap_stderr(lambda s: 7.0, [1, 2, 3]) == 0.0  # a constant has no spread
    assert bootstrap_stderr(np.mean, [1.0]) is None


def test_bootstrap_stderr_skips_undefined_resamples():
    # fn is NaN whenever the single 1 is missing from the resample; the rest still count
    items = np.array([1] + [0] * 9)
    se = bootstrap_stderr(lambda s: float(s.sum()) if s.sum() else math.nan, items, iters=200)
    assert se is not None and se > 0
    assert bootstrap_stderr(lambda s: math.nan, items) is None


# --- multiple choice -------------------------------------------------------------------


def test_mc_predictions_acc_norm_uses_characters_and_first_tie():
    # ll/len: -4/2 = -2, -6/4 = -1.5, -9/6 = -1.5 -> tie between 1 and 2, argmax takes 1
    assert mc_predictions([-4.0, -6.0, -9.0], ["ab", "abcd", "abcdef"]) == (0, 1)
    # characters, not bytes: "서울" is 2 characters (6 UTF-8 bytes): -4/2 = -2 < -6/5 = -1.2
    # -> 1 (by bytes it would be -4/6 = -0.67 > -1.2 -> 0)
    assert mc_predictions([-4.0, -6.0], ["서울", "abcde"]) == (0, 1)
    with pytest.raises(MetricError):
        mc_predictions([-1.0], [""])


def test_truthfulqa_mc1_mc2_hand_values():
    assert truthfulqa_mc1([-1.0, -0.5, -3.0], [1, 0, 0]) == 0.0  # argmax is 1, gold 0
    assert truthfulqa_mc1([-1.0, -0.5, -3.0], [0, 1, 0]) == 1.0
    # probabilities 0.2, 0.3, 0.5, true = first two -> 0.5
    assert truthfulqa_mc2(np.log([0.2, 0.3, 0.5]), [1, 1, 0]) == pytest.approx(0.5)
    # unnormalised: exp -> 1 and 3 -> 1 / 4
    assert truthfulqa_mc2([0.0, math.log(3)], [1, 0]) == pytest.approx(0.25)
    # very negative lls (exp underflows to 0 in lm-eval's form): ratio 1 : 1/3 -> 0.75
    assert truthfulqa_mc2([-1000.0, -1000.0 - math.log(3)], [1, 0]) == pytest.approx(0.75)
    with pytest.raises(MetricError):
        truthfulqa_mc1([-1.0, -2.0], [1, 1])


# --- SQuAD / KorQuAD -------------------------------------------------------------------


def test_squad_em_f1_hand_values():
    assert squad_em("The Cat!", ["a cat"]) == 1.0  # both normalise to "cat"
    assert squad_em("cats", ["cat"]) == 0.0
    # pred [big, cat, sat] vs gold [cat, sat, down]: 2 shared; P = R = 2/3 -> F1 2/3;
    # the second gold shares nothing (0), max -> 2/3
    assert squad_f1("the big cat sat", ["a cat sat down", "dog"]) == pytest.approx(2 / 3)
    # multiset overlap: {x:2, y:1} & {x:1, y:2} = 2 of 3 each way -> 2/3
    assert squad_f1("x x y", ["x y y"]) == pytest.approx(2 / 3)
    assert squad_f1("", ["cat"]) == 0.0


def test_korquad_em_f1_hand_values():
    assert korquad_em("《서울》", ["서울"]) == 1.0  # brackets become spaces, then collapsed
    # characters 서,울,특,별,시 vs 서,울: 2 shared; P = 2/5, R = 1 -> F1 = 0.8 / 1.4 = 4/7
    assert korquad_f1("서울특별시", ["서울"]) == pytest.approx(4 / 7)
    assert korquad_f1("서울 특별시", ["서울"]) == pytest.approx(4 / 7)  # spaces are dropped
    assert squad_f1("서울특별시", ["서울"]) == 0.0  # word-level F1 would give nothing
    # KorQuAD keeps English articles, SQuAD drops them
    assert korquad_em("the answer", ["answer"]) == 0.0
    assert squad_em("the answer", ["answer"]) == 1.0
    assert korquad_em("서울", "부산") == 0.0  # a single gold string is one gold


# --- GSM8K -----------------------------------------------------------------------------


def test_gsm8k_gold_and_extraction():
    assert gsm8k_gold("Natalia sold 48/2 = <<48/2=24>>24 clips.\n#### 72") == "72"
    assert gsm8k_gold("so\n#### 1,000") == "1000"
    # strict: the first "#### number"; "$" and "," removed like lm-eval's regexes_to_ignore
    assert gsm8k_extract("It is $1,000.\n#### 1,000\n#### 5") == "1000"
    assert gsm8k_extract("#### -3") == "-3"
    assert gsm8k_extract("The answer is 72.") is None
    # flexible: matches "$18.50" (group 1), "3" (group 2), "21." (group 1); the last one,
    # trailing "." removed -> "21"
    gen = "She paid $18.50 and got 3 apples, total 21."
    assert gsm8k_extract(gen, "flexible") == "21"
    assert gsm8k_extract("no digits here", "flexible") is None
    assert gsm8k_extract("x is 1,234.5", "flexible") == "1234.5"
    assert gsm8k_correct("so the total is 72.", "...\n#### 72", "flexible") == 1.0
    assert gsm8k_correct("so the total is 72.", "...\n#### 72", "strict") == 0.0
    with pytest.raises(MetricError):
        gsm8k_extract("x", "loose")


# --- translation -----------------------------------------------------------------------


def test_translation_english_hand_values():
    # hyp "the cat sat on a mat" vs ref "the cat sat on the mat", 6 tokens each (13a):
    # 1-gram 5/6, 2-gram 3/5, 3-gram 2/4, 4-gram 1/3, BP 1:
    # BLEU = (5/6 * 3/5 * 1/2 * 1/3)^(1/4) = (1/12)^(1/4) = 0.5372850 -> 53.72850
    # TER: one substitution / 6 reference words = 16.6667
    # chrF of "ab" vs "abc": order 1 P=2/2 R=2/3; order 2 P=1/1 R=1/2; orders 3-6 have no
    # hypothesis n-grams (left out). avgP = 1, avgR = 7/12; F2 = 5*avgP*avgR/(4*avgP+avgR)
    # = (35/12)/(55/12) = 7/11 -> 63.6364
    s = translation_scores(["the cat sat on a mat"], ["the cat sat on the mat"], "en")
    assert s["bleu"].value == pytest.approx(53.72850, abs=1e-4)
    assert s["ter"].value == pytest.approx(100 / 6) and s["ter"].higher_is_better is False
    assert s["bleu"].stderr is None  # one sentence
    assert translation_scores(["ab"], ["abc"], "en")["chrf"].value == pytest.approx(700 / 11)


def test_translation_korean_uses_mecab_morphemes():
    from hcx.evaluation.metrics import _metrics_for

    tok = _metrics_for("ko")[0].tokenizer
    assert tok("나는 학교에 갔다.") == "나 는 학교 에 갔 다 ."
    assert tok("나는 학교에 간다.") == "나 는 학교 에 간다 ."
    # hyp 7 tokens, ref 6: 1-gram 5/7 (나 는 학교 에 .), 2-gram 3/6 (나는, 는학교, 학교에),
    # 3-gram 2/5, 4-gram 1/4; BP 1 (hyp longer): BLEU = (5/7*1/2*2/5*1/4)^(1/4)
    # = (1/28)^(1/4) = 0.4347209 -> 43.47209
    # TER on morphemes: 2 edits (간다 -> 갔 + insert 다) / 6 reference tokens = 33.333
    s = translation_scores(["나는 학교에 갔다."], ["나는 학교에 간다."], "ko")
    assert s["bleu"].value == pytest.approx(43.47209, abs=1e-4)
    assert s["ter"].value == pytest.approx(200 / 6)
    assert KOREAN_BLEU_TOKENIZE == "ko-mecab"
    assert "tok:ko-mecab" in translation_signature("ko")
    assert "tok:13a" in translation_signature("en")
    assert "pretok:ko-mecab" in translation_signature("ko", "ter")


def test_translation_bootstrap_matches_resampling_the_corpus():
    # The fast path (summing per-sentence statistics) must give the same numbers as
    # recomputing corpus BLEU/chrF on each resampled corpus with the same draws.
    rng = np.random.default_rng(0)
    words = "the a cat dog sat ran on under mat rug big small".split()
    refs = [" ".join(rng.choice(words, 8)) for _ in range(30)]
    hyps = [" ".join(rng.choice(words, 8)) for _ in range(30)]
    s = translation_scores(hyps, refs, "en", iters=50)
    pairs = list(zip(hyps, refs))

    def slow(metric):
        return lambda sample: metric([h for h, _ in sample], [[r for _, r in sample]]).score

    assert s["bleu"].value == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score)
    assert s["bleu"].stderr == pytest.approx(bootstrap_stderr(slow(sacrebleu.corpus_bleu), pairs,
                                                              iters=50))
    assert s["chrf"].stderr == pytest.approx(bootstrap_stderr(slow(sacrebleu.corpus_chrf), pairs,
                                                              iters=50))
    assert 0 < s["bleu"].stderr < 20


# --- bias ------------------------------------------------------------------------------


def _bias_records():
    A = "ambig"
    D = "disambig"
    return (
        # ambiguous: 3 unknown, 2 biased, 1 counter-biased, 1 out-of-choice (dropped)
        [BiasRecord(A, "unknown")] * 3 + [BiasRecord(A, "biased")] * 2
        + [BiasRecord(A, "counter_biased"), BiasRecord(A, "out_of_choice")]
        # biased contexts (gold = biased): 3 right, 1 unknown
        + [BiasRecord(D, "biased", True)] * 3 + [BiasRecord(D, "unknown", True)]
        # counter-biased contexts (gold = counter_biased): 2 right, 1 biased, 1 unknown
        + [{"context_condition": D, "answer_type": "counter_biased", "biased_context": False}] * 2
        + [BiasRecord(D, "biased", False), BiasRecord(D, "unknown", False)]
    )


def test_bias_scores_hand_values():
    s = bias_scores(_bias_records())
    # acc_ambig = 3/6 = 0.5; 0/1 values: var (ddof=1) 6*0.25/5 = 0.3, se = sqrt(0.3/6) = 0.2236068
    assert s["acc_ambig"].value == 0.5
    assert s["acc_ambig"].stderr == pytest.approx(0.2236068, abs=1e-7)
    # acc_disambig = (3 + 2) / 8
    assert s["acc_disambig"].value == 0.625
    # diff_bias_ambig = (2 - 1) / 6 = 1/6; values 0,0,0,1,1,-1 around 1/6: squared deviations
    # 3*(1/36) + 2*(25/36) + 49/36 = 102/36; var 102/180 = 0.5666667; se = sqrt(var/6) = 0.3073181
    assert s["diff_bias_ambig"].value == pytest.approx(1 / 6)
    assert s["diff_bias_ambig"].stderr == pytest.approx(0.3073181, abs=1e-7)
    # diff_bias_disambig = 3/4 - 2/4 = 0.25; se^2 = var(1,1,1,0)/4 + var(1,1,0,0)/4
    # = 0.25/4 + (1/3)/4 = 0.1458333 -> se = 0.3818813
    assert s["diff_bias_disambig"].value == pytest.approx(0.25)
    assert s["diff_bias_disambig"].stderr == pytest.approx(0.3818813, abs=1e-7)
    # BBQ disambig: non-unknown answers 3 + 1 biased, 2 counter -> 2 * 4/6 - 1 = 1/3
    assert s["bbq_bias_disambig"].value == pytest.approx(1 / 3)
    # BBQ ambig: non-unknown 2 biased, 1 counter -> s = 2*2/3 - 1 = 1/3; times (1 - 0.5) = 1/6
    assert s["bbq_bias_ambig"].value == pytest.approx(1 / 6)
    assert 0 < s["bbq_bias_ambig"].stderr < 1 and 0 < s["bbq_bias_disambig"].stderr < 1
    assert not s["diff_bias_ambig"].higher_is_better and s["acc_ambig"].higher_is_better
    assert out_of_choice_ratio(_bias_records()) == pytest.approx(1 / 15)


def test_bias_scores_all_unknown_and_errors():
    s = bias_scores([BiasRecord("ambig", "unknown")] * 4)
    assert s["acc_ambig"].value == 1.0 and s["bbq_bias_ambig"].value == 0.0
    assert s["bbq_bias_ambig"].stderr == 0.0
    assert s["acc_disambig"].to_json()["value"] is None  # no disambiguated records
    with pytest.raises(MetricError, match="biased_context"):
        bias_scores([{"context_condition": "disambig", "answer_type": "biased"}])
    with pytest.raises(MetricError, match="answer_type"):
        bias_scores([BiasRecord("ambig", "stereotyped")])


# --- pass@k ----------------------------------------------------------------------------


def test_pass_at_k_hand_values():
    # 1 - C(3,1)/C(5,1) = 1 - 3/5 = 0.4;  1 - C(3,2)/C(5,2) = 1 - 3/10 = 0.7
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4)
    assert pass_at_k(5, 2, 2) == pytest.approx(0.7)
    # 1 - C(7,5)/C(10,5) = 1 - 21/252 = 11/12
    assert pass_at_k(10, 3, 5) == pytest.approx(11 / 12)
    assert pass_at_k(5, 4, 2) == 1.0  # fewer than k failures: every k-subset has a pass
    assert pass_at_k(5, 0, 3) == 0.0
    assert pass_at_k(200, 1, 1) == pytest.approx(0.005)
    with pytest.raises(MetricError):
        pass_at_k(5, 6, 1)
