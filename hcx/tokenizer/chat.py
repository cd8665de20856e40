"""Chat rendering: messages to token ids, the one place the chat layout is defined.

Layout per message: ``<|role|>`` content ``<|endofturn|>``; a generation prompt is a
bare ``<|assistant|>``. The markers are inserted as ids, and content is encoded as
text, so a user who writes ``<|user|>`` gets those characters, never a marker.
``hcx.tokenizer.special_tokens.CHAT_TEMPLATE`` is the same layout for Hugging Face's
``apply_chat_template`` (identical ids whenever the content holds no marker string,
which HF tokenizers would match as a special token).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

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


def _check(messages: list[dict]) -> None:
    for i, message in enumerate(messages):
        role, content = message.get("role"), message.get("content")
        if role not in ROLE_MARKERS:
            raise ChatError(f"message {i}: role {role!r} is not one of {sorted(ROLE_MARKERS)}")
        if not isinstance(content, str):
            raise ChatError(f"message {i}: content is {type(content).__name__}, not a string")


def render_chat(messages: list[dict], tokenizer: Tokenizer,
                add_generation_prompt: bool = False) -> RenderedChat:
    """Token ids of a conversation (``[{"role": ..., "content": ...}, ...]``): hcx's layout
    for a tokenizer with hcx's markers, else the chat template of a Hugging Face
    tokenizer (an imported model's own: :func:`template_chat`)."""
    _check(messages)
    try:
        markers = marker_ids(tokenizer)
    except ChatError as e:
        template = template_tokenizer(tokenizer)
        if template is None:
            raise ChatError(f"{e}, or a Hugging Face tokenizer with a chat template "
                            "(tokenizer_config.json chat_template or chat_template.jinja)") from None
        return template_chat(messages, template, add_generation_prompt)
    ids: list[int] = []
    assistant: list[bool] = []
    for i, message in enumerate(messages):
        role, content = message.get("role"), message.get("content")
        body = tokenizer.encode(content) + [markers[st.END_OF_TURN]]
        ids += [markers[ROLE_MARKERS[role]], *body]
        assistant += [False] + [role == "assistant"] * len(body)
    if add_generation_prompt:
        ids.append(markers[st.ASSISTANT])
        assistant.append(False)
    return RenderedChat(ids, assistant)


# --- a Hugging Face tokenizer's own chat template -------------------------------------


def _has_template(directory: Path) -> bool:
    if (directory / "chat_template.jinja").is_file():
        return True
    config = directory / "tokenizer_config.json"
    try:
        return bool(config.is_file() and json.loads(config.read_text(encoding="utf-8"))
                    .get("chat_template"))
    except ValueError:
        return False


@functools.lru_cache(maxsize=4)
def _open_template(directory: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(directory)


def template_tokenizer(tokenizer: Tokenizer):
    """transformers' tokenizer for an hcx tokenizer read from a Hugging Face directory with
    a chat template (an imported model's), else None."""
    files = getattr(tokenizer, "files", None)
    if not files:
        return None
    directory = Path(files[0]).parent
    return _open_template(str(directory)) if _has_template(directory) else None


def _template_ids(template, messages: list[dict], add_generation_prompt: bool) -> list[int]:
    return list(template.apply_chat_template(messages, tokenize=True, return_dict=False,
                                             add_generation_prompt=add_generation_prompt))


def template_chat(messages: list[dict], template, add_generation_prompt: bool = False) -> RenderedChat:
    """A conversation rendered by a Hugging Face chat template, with its assistant mask.

    Few templates mark the assistant's tokens (``{% generation %}``), so the mask is
    found by rendering prefixes: assistant message ``k`` is what the conversation up to
    and including it adds to the conversation before it with the generation prompt
    opened (its content and the template's end of turn). That needs a template that
    renders earlier turns the same whatever follows; one that does not (Qwen3's drops
    earlier turns' reasoning) is refused, naming the message."""
    full = _template_ids(template, messages, add_generation_prompt)
    assistant = [False] * len(full)
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _template_ids(template, messages[:k], True) if k else []
        upto = _template_ids(template, messages[:k + 1], False)
        if full[:len(before)] != before or full[:len(upto)] != upto:
            raise ChatError(f"message {k}: the chat template renders earlier turns differently "
                            "once later ones follow, so the assistant's tokens cannot be "
                            "found; train on one assistant reply per conversation")
        for i in range(len(before), len(upto)):
            assistant[i] = True
    return RenderedChat(full, assistant)


def template_stop_ids(template) -> tuple[int, ...]:
    """The ids that end an assistant turn under a chat template: the first special token
    the template writes after a reply (Qwen's ``<|im_end|>``, Llama 3's ``<|eot_id|>``),
    and the eos token."""
    messages = [{"role": "user", "content": "hi"}]
    before = _template_ids(template, messages, True)
    full = _template_ids(template, messages + [{"role": "assistant", "content": "ok"}], False)
    special = set(template.all_special_ids) | set(template.added_tokens_decoder)
    ends = [i for i in full[len(before):] if i in special][:1]
    eos = [template.eos_token_id] if template.eos_token_id is not None else []
    return tuple(sorted(set(ends + eos)))
