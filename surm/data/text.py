"""Text preprocessing: one sentence or a sentence pair -> fixed-length BERT inputs.

Every example is padded (and truncated, longest segment first) to exactly ``max_length``
tokens, so that batches have one static shape and the jitted step compiles once.
"""
from __future__ import annotations

import numpy as np
import tokenizers


def _as_str(value) -> str:
    """tfds gives text as bytes (files) or str (mocks)."""
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


class TextPreprocess:
    """Callable ``(example, rng=None) -> dict`` of int32 ``input_ids``, ``attention_mask``,
    ``token_type_ids`` (each ``(max_length,)``) and ``label`` (int32, or float32 for
    regression).

    The given tokenizer is copied, never modified; the copy gets truncation and padding to
    ``max_length`` with ``pad_token``.
    """

    def __init__(self, tokenizer: tokenizers.Tokenizer, *, text_keys: tuple[str, ...],
                 max_length: int = 128, label_key: str = "label", regression: bool = False,
                 pad_token: str = "[PAD]"):
        if len(text_keys) not in (1, 2):
            raise ValueError(f"text_keys must name one sentence or a pair, got {text_keys}")
        pad_id = tokenizer.token_to_id(pad_token)
        if pad_id is None:
            raise ValueError(f"The tokenizer has no padding token {pad_token!r}; pass pad_token")
        self.tokenizer = tokenizers.Tokenizer.from_str(tokenizer.to_str())
        self.tokenizer.enable_truncation(max_length, strategy="longest_first")
        self.tokenizer.enable_padding(length=max_length, pad_id=pad_id, pad_token=pad_token)
        self.text_keys = tuple(text_keys)
        self.max_length = max_length
        self.label_key = label_key
        self.label_dtype = np.float32 if regression else np.int32

    def __call__(self, example: dict, rng: np.random.Generator | None = None) -> dict:
        del rng  # Deterministic.
        encoding = self.tokenizer.encode(*(_as_str(example[key]) for key in self.text_keys))
        return {
            "input_ids": np.asarray(encoding.ids, np.int32),
            "attention_mask": np.asarray(encoding.attention_mask, np.int32),
            "token_type_ids": np.asarray(encoding.type_ids, np.int32),
            "label": self.label_dtype(example[self.label_key]),
        }
