"""The special tokens of hcx tokenizers, in one place.

Ids 0-3 are fixed (pad, unk, bos, eos) so every hcx tokenizer agrees on them; the chat
and fill-in-the-middle markers follow as SentencePiece *control* symbols. SentencePiece
never produces a control symbol from text, so a user who types ``<|user|>`` gets plain
text, never a role marker; code that needs a marker (chat rendering, FIM) inserts its
id directly.
"""

from __future__ import annotations

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<s>", "</s>"

SYSTEM, USER, ASSISTANT, END_OF_TURN = "<|system|>", "<|user|>", "<|assistant|>", "<|endofturn|>"
FIM_PREFIX, FIM_MIDDLE, FIM_SUFFIX = "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>"

CONTROL_SYMBOLS = [SYSTEM, USER, ASSISTANT, END_OF_TURN, FIM_PREFIX, FIM_MIDDLE, FIM_SUFFIX]

# Pieces that are always one token and are ordinary text (they decode to themselves):
# a newline, so that line structure (code!) is never lost inside a longer piece.
USER_SYMBOLS = ["\n"]

# Chat rendering for Hugging Face's apply_chat_template (role marker, content, end of
# turn); hcx.tokenizer.chat.render_chat builds the same ids directly (tests/tokenizer/test_chat.py).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|endofturn|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)
