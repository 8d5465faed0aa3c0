"""Causal language modelling (``surm.lm``): token blocks with a loss mask, the next-token loss,
perplexity over every scored token of a split. The data is a dataset's text field (e.g. the
embedded ``bbc_news``) or ``text:PATH``, a local ``.txt`` or ``.jsonl`` file."""
from __future__ import annotations

import dataclasses
import pathlib

from surm import data, lm, predictions
from surm.config_fields import ConfigError
from surm.tasks.base import Sources, Task

TEXT_FILE = "text:"  # a causal-LM dataset read straight from a .txt or .jsonl file


def _identity(example, rng=None):
    del rng
    return example


class CausalLM(Task):
    name = "causal_lm"

    def data_spec(self, config, entry) -> data.DatasetSpec:
        name = config.input.dataset
        if name.startswith(TEXT_FILE):
            path = pathlib.Path(name[len(TEXT_FILE):])
            if not path.is_file():
                raise FileNotFoundError(f"input.dataset={name!r}: {path} is not a file; give "
                                        f"a .txt or .jsonl file (surm.lm)")
            spec = data.DatasetSpec(name=name, tfds_name="", modality="text", num_classes=0,
                                    splits={})
        else:
            spec = data.get_spec(name)
            if not spec.text_keys:
                raise ConfigError(f"dataset {name!r} has no text for a language model")
        return dataclasses.replace(spec, metrics=(lm.METRIC,), regression=False)

    def sources(self, config, entry, spec) -> Sources:
        """Token blocks of ``input.max_length``, built once: the dataset's text, or the
        ``text:PATH`` file's records."""
        tokenizer = entry.tokenizer(config.model, config.input.max_length)
        eos = entry.eos_id(config.model)
        dataset = None
        if spec.name.startswith(TEXT_FILE):
            records = lm.read_local(spec.name[len(TEXT_FILE):])
        else:
            dataset = data.get_dataset(config.input.dataset, config.input.data_dir or None)
            key = spec.text_keys[0]
            records = {role: [{"text": ex[key]} for ex in dataset.source(role)]
                       for role in ("train", "validation", "test")}
        template = config.input.get("prompt_template") or "{prompt}"
        blocks = {role: lm.blocks_from_records(rs, tokenizer, config.input.max_length, eos,
                                               template=template)
                  for role, rs in records.items()}
        for role, limit in (("validation", config.input.validation_examples),
                            ("test", config.input.get("test_examples", 0))):
            if limit:
                blocks[role] = blocks[role][:limit]
        empty = [role for role, b in blocks.items() if not b]
        if empty:
            raise ConfigError(f"no token blocks for {', '.join(empty)}: the text is too short "
                             f"for input.max_length={config.input.max_length}")
        return Sources(blocks["train"], {"validation": blocks["validation"],
                                         "test": blocks["test"]},
                       _identity, _identity, None, dataset)

    def batch_keys(self, entry) -> tuple[str, ...]:
        return (*entry.input_keys, "loss_mask")

    def eval_keys(self, entry) -> tuple[str, ...]:
        return self.batch_keys(entry)  # the loss mask is the label, and an input

    def loss(self, outputs, batch, spec):
        return lm.loss(outputs, batch)

    def eval_outputs(self, outputs, batch):
        return lm.token_nll(outputs, batch)  # (NLL sum, scored tokens) per block

    def predictions(self, spec, index, outputs, batches):
        return predictions.make("causal_lm", index, outputs, None, spec.metrics)
