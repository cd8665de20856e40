"""Chat rendering: messages to token ids, the one place the chat layout is defined.

Layout per message: ``<|role|>`` content ``<|endofturn|>``; a generation prompt is a
bare ``<|assistant|>``. The markers are inserted as ids, and content is encoded as
text, so a user who writes ``<|user|>`` gets those characters, never a marker.
``hcx.tokenizer.special_tokens.CHAT_TEMPLATE`` is the same layout for Hugging Face's
``apply_chat_template`` (identical ids whenever the content holds no marker string,
which HF tokenizers would match as a special token).
"""

from __future__ import annotations

from dataclasses import dataclass

from hcx.tokenizer import special_tokens as st
from hcx.errors import HcxError
from hcx.tokenizer.loading import Tokenizer

ROLE_MARKERS = {"system": st.SYSTEM, "user": st.USER, "assistant": st.ASSISTANT}


class ChatError(HcxError, ValueError):
    pass


@dataclass
class RenderedChat:
    ids: list[int]
    # True for the tokens an assistant wrote (its content and its end-of-turn marker):
    # what supervised fine-tuning computes the loss on.
    assistant: list[bool]


def marker_ids(tokenizer: Tokenizer) -> dict[str, int]:
    ids = {m: tokenizer.special_id(m) for m in (*ROLE_MARKERS.values(), st.END_OF_TURN)}
    missing = [m for m, i in ids.items() if i is None]
    if missing:
        raise ChatError(f"tokenizer {tokenizer.name} has no {', '.join(missing)}: chat needs an "
                        "hcx tokenizer (hcx tokenizer train)")
    return ids


def render_chat(messages: list[dict], tokenizer: Tokenizer,
                add_generation_prompt: bool = False) -> RenderedChat:
    """Token ids of a conversation (``[{"role": ..., "content": ...}, ...]``)."""
    markers = marker_ids(tokenizer)
    ids: list[int] = []
    assistant: list[bool] = []
    for i, message in enumerate(messages):
        role, content = message.get("role"), message.get("content")
        if role not in ROLE_MARKERS:
            raise ChatError(f"message {i}: role {role!r} is not one of {sorted(ROLE_MARKERS)}")
        if not isinstance(content, str):
            raise ChatError(f"message {i}: content is {type(content).__name__}, not a string")
        body = tokenizer.encode(content) + [markers[st.END_OF_TURN]]
        ids += [markers[ROLE_MARKERS[role]], *body]
        assistant += [False] + [role == "assistant"] * len(body)
    if add_generation_prompt:
        ids.append(markers[st.ASSISTANT])
        assistant.append(False)
    return RenderedChat(ids, assistant)
