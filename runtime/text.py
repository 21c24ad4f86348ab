"""Text in and out: the model's tokenizer, its chat template, and streaming detokenisation."""

from __future__ import annotations

import warnings

from lowerlm.ir.errors import InputError


def load_tokenizer(model):
    """The tokenizer for a model: the one ``lowerlm.load`` recorded, else the model's ``name_or_path``; None
    when there is none (token ids only)."""
    path = getattr(model, "lowerlm_tokenizer_path", None) or getattr(model, "name_or_path", None)
    if not path:
        return None
    from transformers import AutoTokenizer

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError):
        return None


def encode(tokenizer, prompt: str, chat: bool) -> list:
    """Token ids for a prompt; with ``chat`` the user turn goes through the chat template."""
    if tokenizer is None:
        raise InputError("this model has no tokenizer: give token ids instead of text")
    if not prompt.strip():
        raise InputError("the prompt is empty")
    if chat and getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            tokenize=True)
        ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    else:
        ids = tokenizer.encode(prompt)
    return list(ids)


class StreamDecoder:
    """Turns a growing list of token ids into text pieces, holding back an incomplete UTF-8 character."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list = []
        self.emitted = 0

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return ""
        piece, self.emitted = text[self.emitted:], len(text)
        return piece
