"""Tokens as text for OpenAI's ``logprobs`` objects.

A token is shown as the text it adds after the tokens before it (``" the"``, as
OpenAI and vLLM show them), the same for the sequence's tokens and for the
alternatives in ``top_logprobs``, so a client comparing the most likely alternative
with the actual token (lm-evaluation-harness's greedy check) compares like with like.
A token that adds no text of its own (a control token, or a byte of a character
spread over several tokens) is shown as ``token_id:N`` (vLLM's notation), which keeps
different tokens apart.
"""

from __future__ import annotations

from hcx.serving.batches import SequenceScores

CONTEXT = 4  # tokens before a token that decide how it decodes (a leading space)


def token_text(tokenizer, before: list[int], token: int) -> str:
    """The text ``token`` adds after ``before`` (only its last few tokens matter)."""
    tail = before[-CONTEXT:]
    base = tokenizer.decode(tail) if tail else ""
    text = tokenizer.decode(tail + [token])
    piece = text[len(base):] if text.startswith(base) else ""
    if not piece or "\ufffd" in piece:
        return f"token_id:{token}"
    return piece


def text_offsets(tokenizer, ids: list[int], start: int) -> list[int]:
    """Where each token from ``start`` on begins in the decoded text of ``ids[start:]``
    (character offsets)."""
    shown = ids[start:]
    return [len(tokenizer.decode(shown[:j])) for j in range(len(shown))]


def logprobs_object(tokenizer, ids: list[int], scores: SequenceScores, start: int,
                    top: int, offset: int = 0) -> dict:
    """OpenAI's ``logprobs`` of a completion choice for the tokens ``ids[start:]``
    (``start`` 0: with the prompt, whose first token has no log-probability).
    ``scores`` are the whole sequence's; ``offset`` shifts ``text_offset``."""
    tokens, token_logprobs, top_logprobs = [], [], []
    for i in range(start, len(ids)):
        tokens.append(token_text(tokenizer, ids[:i], ids[i]))
        if i == 0:
            token_logprobs.append(None)
            top_logprobs.append(None)
            continue
        token_logprobs.append(scores.logprobs[i - 1])
        alternatives = {token_text(tokenizer, ids[:i], t): lp for t, lp in
                        zip(scores.top_ids[i - 1][:top], scores.top_logprobs[i - 1][:top])}
        alternatives.setdefault(tokens[-1], scores.logprobs[i - 1])  # the actual token too
        top_logprobs.append(alternatives)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs,
            "text_offset": [offset + o for o in text_offsets(tokenizer, ids, start)]}
