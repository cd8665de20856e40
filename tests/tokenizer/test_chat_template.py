"""Chat rendering with an imported model's own tokenizer: no hcx markers, a Hugging Face
chat template (ChatML, as Qwen's) renders the conversation, and the assistant mask
covers each reply and the template's end of turn."""

import json

import pytest

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture
def chatml_tokenizer(tmp_path):
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    words = ["user", "assistant", "system", "hi", "there", "how", "are", "you", "fine", "\n"]
    vocab = {"<unk>": 0, "<|endoftext|>": 1, **{w: i + 2 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split("\n", "isolated"),
                                                 pre_tokenizers.Split(" ", "removed")])
    tok.add_special_tokens([AddedToken(t, special=True) for t in ("<|im_start|>", "<|im_end|>")])
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "chat_template": CHATML,
        "tokenizer_class": "PreTrainedTokenizerFast"}))
    from hcx.tokenizer.loading import open_tokenizer

    return open_tokenizer(str(tmp_path))


def test_a_chat_template_renders_with_an_assistant_mask(chatml_tokenizer):
    from hcx.tokenizer.chat import render_chat

    tok = chatml_tokenizer
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hi there"},
                {"role": "user", "content": "how are you"}, {"role": "assistant", "content": "fine"}]
    rendered = render_chat(messages, tok)
    pieces = [tok.tok.id_to_token(i) for i in rendered.ids]
    assert pieces == [p for m in messages for p in
                      ["<|im_start|>", m["role"], "\n", *m["content"].split(), "<|im_end|>", "\n"]]
    learned = [p for p, a in zip(pieces, rendered.assistant) if a]
    # each reply and its end of turn (with the template's newline after it)
    assert learned == ["hi", "there", "<|im_end|>", "\n", "fine", "<|im_end|>", "\n"]
    prompt = render_chat(messages[:1], tok, add_generation_prompt=True)
    assert [tok.tok.id_to_token(i) for i in prompt.ids[-3:]] == ["<|im_start|>", "assistant", "\n"]
    assert not any(prompt.assistant)


def test_chat_stops_at_the_templates_end_of_turn(chatml_tokenizer):
    from hcx.engine.generate import chat_stop_ids

    tok = chatml_tokenizer
    assert chat_stop_ids(tok) == tuple(sorted({tok.eod, tok.special_id("<|im_end|>")}))


def test_sft_tokenizes_with_the_template(chatml_tokenizer):
    from hcx.stages.sft import tokenize

    example = tokenize([{"role": "user", "content": "hi"},
                        {"role": "assistant", "content": "fine"}], chatml_tokenizer)
    assert sum(example.assistant) == 3  # fine, <|im_end|>, \n


def test_a_tokenizer_with_neither_markers_nor_template_is_refused(tmp_path, chatml_tokenizer):
    from hcx.tokenizer.chat import ChatError, render_chat
    from hcx.tokenizer.loading import open_tokenizer

    directory = tmp_path / "bare"
    directory.mkdir()
    (directory / "tokenizer.json").write_bytes((tmp_path / "tokenizer.json").read_bytes())
    with pytest.raises(ChatError, match=r"has no <\|system\|>.*: chat needs an hcx tokenizer "
                                        r"\(hcx tokenizer train\), or a Hugging Face tokenizer "
                                        "with a chat template"):
        render_chat([{"role": "user", "content": "hi"}], open_tokenizer(str(directory)))
