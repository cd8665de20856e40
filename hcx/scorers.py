"""Ready-made scorers for f-DPG targets (``align.fdpg.scorer: hcx.scorers:NAME``) and
GRPO/RLOO rewards (``align.online.reward: hcx.scorers:NAME``, :mod:`hcx.stages.rewards`).

A scorer is any Python callable ``scorer(prompts, completions) -> list[float]`` taking
the decoded prompt and completion of each sample. For a pointwise constraint
(``align.fdpg.target: constraint``) it returns b(x) in {0, 1}; for a reward target it
returns r(x). Write your own in any importable module and name it ``module:function``;
a trained reward model is ``reward-model:PATH``.
"""

from __future__ import annotations

import unicodedata


def _letters(text: str) -> list[str]:
    return [c for c in text if c.isalpha()]


def hangul_fraction(text: str) -> float:
    """Share of letters that are Hangul syllables or jamo (0 for text without letters)."""
    letters = _letters(text)
    if not letters:
        return 0.0
    return sum("HANGUL" in unicodedata.name(c, "") for c in letters) / len(letters)


def korean(prompts: list[str], completions: list[str]) -> list[float]:
    """b(x) = 1 when most of the completion's letters are Korean (a language constraint
    for a bilingual model)."""
    return [float(hangul_fraction(c) > 0.5) for c in completions]


def has_digit(prompts: list[str], completions: list[str]) -> list[float]:
    """b(x) = 1 when the completion contains a digit."""
    return [float(any(ch.isdigit() for ch in c)) for c in completions]


def korean_share(prompts: list[str], completions: list[str]) -> list[float]:
    """r(x) = the share of Korean letters in the completion, in [0, 1] (a reward)."""
    return [hangul_fraction(c) for c in completions]
