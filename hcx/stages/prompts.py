"""Prompts of the stages that sample their own completions (f-DPG, GRPO, RLOO) and of
AI-feedback data: read from data records, the answer of chat SFT data split off, encoded
with the open assistant turn and cut to leave room for the completion."""

from __future__ import annotations

from dataclasses import dataclass

from hcx.data.sources import BadRecord, SourceError, parse_object, read_sources, source_records
from hcx.stages.align import AlignError


@dataclass
class Prompt:
    ids: list[int]  # with the open assistant turn, cut to leave room for the completion
    prompt: str | list[dict]  # as the data gives it
    record: dict  # the data record (the math answer, the code tests, ...)

    @property
    def text(self) -> str:
        """The prompt as one string (a conversation's contents, one per line): what a
        scorer ``(prompts, completions) -> scores`` receives."""
        if isinstance(self.prompt, str):
            return self.prompt
        return "\n".join(str(m.get("content", "")) for m in self.prompt)


def split_answer(prompt, record: dict, answer_field: str = "answer"):
    """A chat prompt ending with an assistant turn (chat SFT data) loses that turn, which
    becomes the record's ``answer_field`` unless the record has one: the answer is not
    asked, and verifiable rewards check against it."""
    if isinstance(prompt, list) and prompt and isinstance(prompt[-1], dict) and \
            prompt[-1].get("role") == "assistant":
        record = dict(record)
        record.setdefault(answer_field, prompt[-1].get("content", ""))
        prompt = prompt[:-1]
    return prompt, record


def room_errors(section: str, seq_length: int, max_new_tokens: int) -> list[tuple[str, str]]:
    """``(key, message)`` when ``max_new_tokens`` leaves no room for a prompt."""
    if seq_length + 1 - max_new_tokens < 8:
        return [(f"{section}.max_new_tokens", f"{section}.max_new_tokens={max_new_tokens} "
                 f"leaves no room for a prompt in data.seq_length={seq_length}")]
    return []


def read_prompts(recipe, tokenizer, log, *, section: str, field: str, chat: bool,
                 max_new_tokens: int, answer_field: str = "answer",
                 weighted: bool = True) -> list[Prompt]:
    """Every prompt of ``recipe.data.sources`` (their ``field``: text or chat messages),
    encoded with the open assistant turn and cut to leave room for ``max_new_tokens``
    (oldest tokens first). ``weighted``: sources weighted as SFT weights them, else every
    prompt once per epoch. Errors name ``section`` (``align.online``, ``align.fdpg``)."""
    from hcx.engine.generate import encode_prompt

    problems = room_errors(section, recipe.data.seq_length, max_new_tokens)
    if problems:
        raise AlignError(problems[0][1])
    room = recipe.data.seq_length + 1 - max_new_tokens
    keep = min(room, recipe.align.max_prompt_length or room)

    def read(source) -> list[Prompt]:
        out = []
        for record in source_records(source):
            try:
                obj = parse_object(record)
                prompt, obj = split_answer(obj.get(field), obj, answer_field)
                if not (isinstance(prompt, (str, list)) and prompt):
                    raise BadRecord(record.where, "missing_field", f"field {field!r} "
                                    f"({section}.prompts_field) must be a string or a list "
                                    "of messages")
                ids = encode_prompt(prompt, tokenizer, chat)
            except BadRecord as e:
                if not recipe.align.skip_bad:
                    raise AlignError(f"{e} (use align.skip_bad to skip bad records)") from None
                continue
            except Exception as e:  # a chat error names the message at fault
                raise AlignError(f"{record.where}: {e}") from None
            out.append(Prompt(ids[-keep:], prompt, obj))
        return out

    try:
        out = read_sources(recipe.data.sources, read, recipe.train.seed, "prompts",
                           lambda m: log(f"{recipe.align.method}: {m}"), weighted=weighted)
    except SourceError as e:
        raise AlignError(str(e)) from None
    if not out:
        raise AlignError("no prompts in data.sources")
    return out
