"""Causal language modelling: text -> fixed-length token blocks with a loss mask, the next-token
loss, and perplexity.

    blocks = lm.pack([tok.encode(t).ids for t in texts], length=256, eos_id=eos)
    examples = lm.instruction_examples(records, tok, length=256, eos_id=eos)  # prompt/response
    loss = lm.loss(logits, batch)                 # mean next-token NLL over the masked tokens
    sums = lm.token_nll(logits, batch)            # (batch, 2): NLL sum and token count
    ppl = lm.perplexity(sums)                     # exp(total NLL / total tokens)

A block is ``{"input_ids": int32 (length,), "loss_mask": int32 (length,)}``: ``loss_mask[t]``
is 1 where token ``t + 1`` is a target (the model at position ``t`` predicts it), so padding,
the last position and (for instructions) the prompt are never scored. Every block has the same
length, so a training step compiles once.

- ``pack``: plain text. Documents are joined, each followed by ``eos_id``, and cut into blocks
  of ``length`` tokens (the tail padded). A block may hold the end of one document and the
  start of the next; attention is causal only, as in GPT-2's and Hugging Face's run_clm
  packing, so a document's tokens may attend to the previous document's tail.
- ``instruction_examples``: ``{"prompt", "response"}`` records, one per block (truncated on
  the right, padded), the loss on the response and its end-of-sequence token only.

Text sources (``text_records``): a dataset's text field (e.g. the embedded ``bbc_news``
articles, split as the dataset splits them), or a local file: ``.txt`` (documents separated by
blank lines) or ``.jsonl`` (``text``, or ``prompt`` and ``response``, fields per line), split
into train / validation / test by a fixed hash of each record (90 / 5 / 5 %); a file too small
to give every split a record is refused, never split with overlap. Fields must be JSON strings.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import pathlib
from typing import Any, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from surm.data import paths
from surm.data.text import _as_str

METRIC = "perplexity"  # a causal LM's headline metric (lower is better: surm.metrics)

# Share of a local file's records in each split, decided by a hash of the record.
LOCAL_SPLITS = (("train", 0.90), ("validation", 0.05), ("test", 0.05))


def pack(documents: Iterable[Sequence[int]], length: int, eos_id: int,
         pad_id: int | None = None) -> list[dict[str, np.ndarray]]:
    """Token blocks of ``length`` from documents joined with ``eos_id`` after each."""
    if length < 2:
        raise ValueError(f"a block needs at least 2 tokens (one input, one target), got "
                         f"length={length}")
    stream = [t for doc in documents for t in (*doc, eos_id)]
    pad = eos_id if pad_id is None else pad_id
    blocks = []
    for start in range(0, len(stream), length):
        chunk = stream[start:start + length]
        if len(chunk) < 2:
            break  # a lone final token predicts nothing
        ids = np.full(length, pad, np.int32)
        ids[:len(chunk)] = chunk
        mask = np.zeros(length, np.int32)
        mask[:len(chunk) - 1] = 1
        blocks.append({"input_ids": ids, "loss_mask": mask})
    return blocks


def instruction_examples(records: Iterable[dict], tokenizer, length: int, eos_id: int,
                         pad_id: int | None = None, template: str = "{prompt}",
                         ) -> list[dict[str, np.ndarray]]:
    """One block per ``{"prompt", "response"}`` record: ``template.format(prompt=...)`` then the
    response and ``eos_id``; the loss on the response tokens and the end token only."""
    pad = eos_id if pad_id is None else pad_id
    out = []
    for i, r in enumerate(records):
        if "prompt" not in r or "response" not in r:
            raise ValueError(f"instruction record {i} has fields {sorted(r)}; it needs "
                             f"'prompt' and 'response'")
        prompt = tokenizer.encode(template.format(prompt=r["prompt"])).ids
        response = [*tokenizer.encode(str(r["response"])).ids, eos_id]
        ids = (prompt + response)[:length]
        if len(prompt) >= len(ids):
            continue  # the prompt fills the block: nothing of the response to learn
        block = np.full(length, pad, np.int32)
        block[:len(ids)] = ids
        mask = np.zeros(length, np.int32)
        mask[len(prompt) - 1:len(ids) - 1] = 1  # positions whose next token is the response
        out.append({"input_ids": block, "loss_mask": mask})
    return out


def _split_of(text: str) -> str:
    u = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") / 2**64
    edge = 0.0
    for role, share in LOCAL_SPLITS:
        edge += share
        if u < edge:
            return role
    return LOCAL_SPLITS[-1][0]


def read_local(path: str | os.PathLike) -> dict[str, list[dict]]:
    """{role: records} of a ``.txt`` or ``.jsonl`` file (module docstring)."""
    path = pathlib.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"text file {path} does not exist")
    if path.is_dir():
        raise ValueError(f"{path} is a folder; give a .txt or .jsonl file")
    problem = paths.not_plain(path)
    if problem:
        raise ValueError(problem)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        line = path.read_bytes()[:e.start].count(b"\n") + 1
        raise ValueError(f"{path} is not UTF-8 (line {line}, byte {e.start}); save it as UTF-8"
                         ) from None
    if path.suffix == ".jsonl":
        records = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n} is not a JSON object: {e}") from None
            if not isinstance(r, dict) or not ({"text"} <= set(r)
                                               or {"prompt", "response"} <= set(r)):
                raise ValueError(f"{path}:{n}: each line needs a 'text' field, or 'prompt' "
                                 f"and 'response' fields")
            for key in ("text", "prompt", "response"):
                if key in r and not isinstance(r[key], str):
                    raise ValueError(f"{path}:{n}: '{key}' is {json.dumps(r[key])[:40]}, not "
                                     f"text; write it as a JSON string")
            records.append(r)
    elif path.suffix == ".txt":
        docs = [d.strip() for d in text.split("\n\n")]
        records = [{"text": d} for d in docs if d]
    else:
        raise ValueError(f"{path}: a causal-LM text file is .txt (documents separated by blank "
                         f"lines) or .jsonl ('text', or 'prompt' and 'response', per line)")
    if not records:
        raise ValueError(f"{path} holds no text")
    kinds = {"instruction" if "prompt" in r else "text" for r in records}
    if len(kinds) > 1:
        raise ValueError(f"{path} mixes 'text' records and 'prompt'/'response' records; use one")
    splits = {role: [] for role, _ in LOCAL_SPLITS}
    for r in records:
        splits[_split_of(json.dumps(r, sort_keys=True))].append(r)
    empty = [role for role, rs in splits.items() if not rs]
    if empty:  # never the training text reused as validation or test
        raise ValueError(f"{path} holds {len(records)} record(s), too few to split by hash "
                         f"into train / validation / test (90 / 5 / 5%): no {' or '.join(empty)} "
                         f"record; give more records (about 60 or more; in a .txt, documents "
                         f"separated by blank lines)")
    return splits


def blocks_from_records(records: Sequence[dict], tokenizer, length: int, eos_id: int,
                        text_key: str = "text", template: str = "{prompt}") -> list[dict]:
    """``pack`` for text records, ``instruction_examples`` for prompt/response records."""
    if records and "prompt" in records[0] and "response" in records[0]:
        return instruction_examples(records, tokenizer, length, eos_id, template=template)
    texts = [_as_str(r[text_key]) for r in records]
    return pack((e.ids for e in tokenizer.encode_batch(texts, add_special_tokens=False)),
                length, eos_id)


# ---------------------------------------------------------------- loss and metric

def token_nll(logits: jax.Array, batch: dict[str, Any]) -> jax.Array:
    """(batch, 2): per example, the summed next-token NLL over ``loss_mask`` and the number of
    scored tokens."""
    targets = batch["input_ids"][:, 1:]
    mask = batch["loss_mask"][:, :-1].astype(jnp.float32)
    nll = optax.softmax_cross_entropy_with_integer_labels(
        logits[:, :-1].astype(jnp.float32), targets)
    return jnp.stack([(nll * mask).sum(axis=1), mask.sum(axis=1)], axis=1)


def loss(logits: jax.Array, batch: dict[str, Any]) -> jax.Array:
    """Mean next-token NLL over the scored tokens of the batch."""
    sums = token_nll(logits, batch)
    return sums[:, 0].sum() / jnp.maximum(sums[:, 1].sum(), 1.0)


def perplexity(sums: np.ndarray) -> dict[str, float]:
    """{"perplexity", "loss", "tokens"} from stacked ``token_nll`` rows."""
    sums = np.asarray(sums, np.float64).reshape(-1, 2)
    total, count = sums[:, 0].sum(), sums[:, 1].sum()
    if count == 0:
        raise ValueError("no scored tokens: every loss_mask is zero")
    mean = total / count
    return {"perplexity": float(math.exp(min(mean, 700.0))), "loss": float(mean),
            "tokens": int(count)}
