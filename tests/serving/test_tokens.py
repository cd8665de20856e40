"""The pieces of ``hcx serve``'s answers that need no model: which tokens a choice
shows, how tokens are written, and what a rejected request is told."""

from types import SimpleNamespace

import pytest

pytest.importorskip("fastapi")

from hcx.serving.app import to_choice  # noqa: E402
from hcx.serving.batches import SequenceScores  # noqa: E402
from hcx.serving.protocol import CompletionRequest, validation_message  # noqa: E402
from hcx.serving.tokens import logprobs_object, token_text  # noqa: E402
from hcx.tokenizer.loading import ByteTokenizer  # noqa: E402


def served(tok):
    model = SimpleNamespace(stop_ids=(tok.eod,), decode=tok.decode)
    return SimpleNamespace(model=model)


def test_a_choice_shows_the_tokens_behind_its_text_and_its_stop_token():
    tok = ByteTokenizer()
    s = served(tok)
    ab = tok.encode("ab")
    # ended by the end of document: the token stays (lm-eval drops the last one)
    c = to_choice(s, SimpleNamespace(ids=ab + [tok.eod], text="ab", finish_reason="stop"))
    assert c.ids == ab + [tok.eod] and c.generated == 3
    # ended by a stop string "b\n": cut after the token where it begins
    c = to_choice(s, SimpleNamespace(ids=tok.encode("ab\n"), text="a", finish_reason="stop"))
    assert c.ids == tok.encode("a") and c.generated == 3
    c = to_choice(s, SimpleNamespace(ids=ab, text="ab", finish_reason="length"))
    assert c.ids == ab


def test_tokens_are_the_text_they_add_or_their_id():
    tok = ByteTokenizer()
    ids = tok.encode("a 한")  # 한: three bytes, none a character alone
    assert [token_text(tok, ids[:i], t) for i, t in enumerate(ids)] == (
        ["a", " "] + [f"token_id:{b}" for b in "한".encode()])
    assert token_text(tok, [], tok.eod) == f"token_id:{tok.eod}"


def test_logprobs_object_with_echo_and_without():
    tok = ByteTokenizer()
    ids = tok.encode("abc")
    scores = SequenceScores(logprobs=[-1.0, -2.0], top_ids=[[ord("b"), ord("x")], [ord("y"), 0xE3]],
                            top_logprobs=[[-1.0, -3.0], [-0.5, -4.0]])
    echo = logprobs_object(tok, ids, scores, 0, top=2)
    assert echo["tokens"] == ["a", "b", "c"]
    assert echo["token_logprobs"] == [None, -1.0, -2.0]
    assert echo["top_logprobs"] == [None, {"b": -1.0, "x": -3.0},
                                    {"y": -0.5, "token_id:227": -4.0, "c": -2.0}]
    assert echo["text_offset"] == [0, 1, 2]
    tail = logprobs_object(tok, ids, scores, 2, top=1)
    assert tail == {"tokens": ["c"], "token_logprobs": [-2.0],
                    "top_logprobs": [{"y": -0.5, "c": -2.0}], "text_offset": [0]}


@pytest.mark.parametrize("body,field,words", [
    ({"prompt": "x", "temperature": -1}, "temperature", "greater than or equal to 0"),
    ({"prompt": {"a": 1}}, "prompt", "a list of token ids"),
    ({}, "prompt", "required"),
    ({"prompt": "x", "logprobs": 9}, "logprobs", "less than or equal to 5"),
    ({"prompt": "x", "stop": 3}, "stop", "a string or a list of strings"),
])
def test_validation_messages_name_the_field(body, field, words):
    from pydantic import ValidationError

    with pytest.raises(ValidationError) as e:
        CompletionRequest.model_validate(body)
    errors = [{**err, "loc": ("body", *err["loc"])} for err in e.value.errors()]
    message, param = validation_message(errors)
    assert param == field and message.startswith(field) and words in message.lower(), message
