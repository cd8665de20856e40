"""What clients send (pydantic schemas of the OpenAI and vLLM routes ``hcx serve``
answers) and the errors they get back, in OpenAI's shape:
``{"error": {"message", "type", "param", "code"}}``.

Unknown fields are ignored, as OpenAI-compatible servers do (clients send ``user``,
``frequency_penalty`` and the like); the fields below are validated and a bad value is
a 400 naming the field.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from hcx.errors import HcxError

MAX_N = 64  # choices per prompt: a batch of copies, kept bounded


class ApiError(HcxError):
    """An answer other than 200: ``status`` and an OpenAI error body."""

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 code: str | None = None, kind: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.kind = kind or ("server_error" if status >= 500 else "invalid_request_error")

    def body(self) -> dict:
        return error_body(self.message, self.kind, self.param, self.code)


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class Request(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None  # None: the served model
    temperature: float | None = Field(None, ge=0)  # None: 1.0, as OpenAI
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = None  # None: a fresh seed per request
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False


class CompletionRequest(Request):
    """``POST /v1/completions`` (OpenAI's legacy completions)."""

    # A text, token ids, or a list of either (one choice per prompt, in order).
    prompt: str | list[str] | list[list[int]] | list[int]
    max_tokens: int | None = Field(16, ge=0)
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatRequest(Request):
    """``POST /v1/chat/completions``."""

    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)  # None: what fits the window
    max_completion_tokens: int | None = Field(None, ge=1)  # OpenAI's newer name for it


class TokenizeRequest(BaseModel):
    """``POST /tokenize`` (vLLM): a text, or chat messages rendered as ``/v1/chat`` does."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    prompt: str | None = None
    messages: list[Message] | None = None


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    tokens: list[int]


# What a wrong type of these fields means, in words (pydantic's union errors list
# every alternative).
FIELD_HINTS = {
    "prompt": "expected a string, a list of strings, a list of token ids or a list of "
              "lists of token ids",
    "stop": "expected a string or a list of strings",
    "messages": "expected a list of messages, each with a role (system, user or "
                "assistant) and a string content",
}


def validation_message(errors: list[dict]) -> tuple[str, str | None]:
    """A readable message and the field at fault from pydantic's error list (what
    FastAPI would answer as a 422)."""
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    loc = [str(p) for p in first.get("loc", ())]
    if first.get("type") == "json_invalid":
        return (f"the request body is not valid JSON: {first.get('ctx', {}).get('error', first['msg'])}",
                None)
    if loc == ["body"]:
        return "the request body must be a JSON object", None
    field = loc[1] if len(loc) > 1 and loc[0] == "body" else (loc[0] if loc else None)
    if field in FIELD_HINTS and (first.get("type") in ("missing",) or len(errors) > 1
                                 or len(loc) > 2):
        msg = "field required" if first.get("type") == "missing" else FIELD_HINTS[field]
        return f"{field}: {msg}", field
    where = ".".join(loc[1:]) if loc and loc[0] == "body" else ".".join(loc)
    return f"{where}: {first['msg']}", field
