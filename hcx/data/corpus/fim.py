"""Fill-in-the-middle (FIM) rearrangement of code documents.

Bavarian et al. 2022 ("Efficient Training of Language Models to Fill in the
Middle") and StarCoder: a document is cut into prefix/middle/suffix and trained as
``[PRE] prefix [SUF] suffix [MID] middle`` (PSM), so a left-to-right model learns to
write the middle after seeing both sides. The cut is made on characters, before
tokenisation, so no token is split across pieces; the caller tokenises each piece.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MODES = ("thirds", "random")


@dataclass(frozen=True)
class FimIds:
    """Token ids of the three sentinel tokens."""

    prefix: int
    middle: int
    suffix: int


def fim_split(text: str, mode: str, rng: np.random.Generator) -> tuple[str, str, str]:
    """Cut ``text`` into (prefix, middle, suffix); ``prefix + middle + suffix == text``.

    - ``"thirds"``: cuts at ``len // 3`` and ``2 * len // 3`` (HyperCLOVA X's fixed
      split); ``rng`` is not used, so the result depends on the text alone.
    - ``"random"``: two cut points drawn uniformly from ``[0, len]`` and sorted, as in
      Bavarian et al.; they may coincide (an empty middle) or sit at an end.
    """
    n = len(text)
    if mode == "thirds":
        lo, hi = n // 3, 2 * n // 3
    elif mode == "random":
        lo, hi = sorted(int(i) for i in rng.integers(0, n + 1, size=2))
    else:
        raise ValueError(f"FIM mode must be one of {MODES}, got {mode!r}")
    return text[:lo], text[lo:hi], text[hi:]


def fim_layout(prefix: list[int], middle: list[int], suffix: list[int], ids: FimIds,
               spm: bool) -> list[int]:
    """The tokens of one FIM example, without an end-of-document token.

    PSM: ``[PRE] prefix [SUF] suffix [MID] middle``.
    SPM, the variant Bavarian et al. train jointly with PSM (and StarCoder uses):
    ``[PRE] [SUF] suffix [MID] prefix middle``. Putting the prefix right before the
    middle makes the middle a plain continuation of the prefix, which suits KV-cache
    reuse at inference; the sentinels still mark where the suffix sits.
    """
    if spm:
        return [ids.prefix, ids.suffix, *suffix, ids.middle, *prefix, *middle]
    return [ids.prefix, *prefix, ids.suffix, *suffix, ids.middle, *middle]
