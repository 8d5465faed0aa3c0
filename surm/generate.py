"""Text from a causal LM: ``python -m surm.generate --workdir W --prompt "..."`` (a fine-tuned
run) or ``--checkpoint smollm2`` (a base model, no training run).

    python -m surm.generate --checkpoint smollm2 --prompt "Why is the sky blue?" --chat
    python -m surm.generate --workdir runs/lm --prompt "The bank said"
    python -m surm.generate --workdir runs/lm --prompt "Summarise: ..." --chat \\
        --temperature 0.7 --top_p 0.9 --max_tokens 80 --seed 1
    python -m surm.generate --workdir runs/lm --prompt "..." --unmerged   # adapters applied

The library API does the same:

    gen = surm.generate.Generator.from_workdir("runs/lm")        # merged (default)
    print(gen("The bank said", max_tokens=40))

``W`` is a finished ``surm.train`` workdir of a causal-LM config (``configs/causal_lm.py``):
its base model is rebuilt from the config (the same GGUF file), its adapters read from
``W/adapters`` and, by default, merged into the weights (``surm.peft.merge``: the plain model,
no adapter cost per token); ``--unmerged`` runs the model with the adapters applied instead
(the same tokens up to float rounding). Decoding is greedy at temperature 0, else sampled
(``--top_p`` < 1: nucleus sampling), and stops at the model's end-of-text token or after
``--max_tokens``. ``--chat`` wraps the prompt in the model's chat template for one user turn
(the GGUF file's ``tokenizer.chat_template``, else ChatML). The time to the first token and
the tokens per second after it are printed to stderr.
"""
from __future__ import annotations

import argparse
import math
import pathlib
import sys

import jax
import ml_collections
import numpy as np

from surm import allocator, models, peft, runs
from surm import workdir as workdir_files
from surm.models import llama_generate


class Generator:
    """A causal LM (with trained adapters, or a base model alone), and its tokenizer."""

    def __init__(self, config: ml_collections.ConfigDict, model, base: dict,
                 trainable: dict | None = None, spec: peft.PeftSpec | None = None, *,
                 merged: bool = True):
        self.config, self.model, self.spec, self.merged = config, model, spec, merged
        entry = models.get(config.model.name)
        self.tokenizer = entry.tokenizer(config.model, config.input.max_length)
        self.eos_id = entry.eos_id(config.model)
        self.chat_template = entry.chat_template(config.model)
        self.stats: dict = {}  # of the last call: tokens, time to first token, tokens/s
        self.apply_fn = None
        if spec is None:  # the base model alone
            self.params = base
        elif merged:
            _, frozen = peft.split(base, spec)
            self.params = peft.merge(peft.full_params(frozen, trainable), trainable["adapters"],
                                     spec)
        else:
            _, frozen = peft.split(base, spec)
            frozen = jax.device_put(frozen)
            self.params = trainable

            def apply_fn(tr, tokens, cache, index):  # a token's update by the fast product:
                # folding every kernel again at each token would cost a matrix per layer
                return peft.apply(model, frozen, tr, spec, tokens, cache, index,
                                  lora_path="structured")
            self.apply_fn = apply_fn
        self.params = jax.device_put(self.params)  # once: never copied per token

    @classmethod
    def from_workdir(cls, workdir: str | pathlib.Path, *, merged: bool = True) -> "Generator":
        workdir = workdir_files.local(workdir)
        config = runs.finished_config(workdir)
        if not models.is_causal_lm(models.get(config.model.name)):
            raise ValueError(f"{workdir} trained model.name={config.model.name!r}, a "
                             f"classifier; surm.generate continues text with a causal LM "
                             f"(configs/causal_lm.py)")
        run = runs.load_run(workdir)
        return cls(run.config, run.model, run.base, run.trainable, run.spec, merged=merged)

    @classmethod
    def from_checkpoint(cls, checkpoint: str = "smollm2", *, dtype: str = "float32",
                        model: str = "llama") -> "Generator":
        """A base model with no training run: ``checkpoint`` is what ``model.checkpoint``
        takes (``smollm2``, a ``.gguf`` path)."""
        entry = models.get(model)
        if not models.is_causal_lm(entry):
            raise ValueError(f"model {model!r} is not a causal language model")
        config = ml_collections.ConfigDict({
            "model": {"name": model, "checkpoint": checkpoint, "dtype": dtype},
            "input": {"max_length": 0}})
        entry.check(config.model)
        built, base, _ = entry.build(config.model, 0, jax.random.PRNGKey(0))
        return cls(config, built, base)

    def __call__(self, prompt: str, *, max_tokens: int = 64, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int = 0, chat: bool = False) -> str:
        text = llama_generate.chat_prompt(prompt, template=self.chat_template) if chat else \
            prompt
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        if not ids:
            raise ValueError("the prompt is empty")
        self.stats = {}
        new = llama_generate.generate(self.model, self.params, np.asarray(ids), max_tokens,
                                      temperature=temperature, top_p=top_p, eos_id=self.eos_id,
                                      rng=jax.random.key(seed), apply_fn=self.apply_fn,
                                      stats=self.stats)
        new = [int(t) for t in new]
        if self.eos_id in new:
            new = new[:new.index(self.eos_id)]
        return self.tokenizer.decode(new, skip_special_tokens=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m surm.generate",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--workdir", help="a finished causal-LM run: its model and adapters")
    source.add_argument("--checkpoint", help="a base model alone, no training run: smollm2 or "
                        "a .gguf file")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max_tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top_p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--chat", action="store_true", help="wrap the prompt as one user turn")
    p.add_argument("--unmerged", action="store_true",
                   help="apply the adapters at each token instead of merging them first")
    args = p.parse_args(argv)
    if args.max_tokens < 1:
        p.error("--max_tokens must be >= 1")
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        p.error(f"--temperature must be a finite number >= 0 (0: greedy), got "
                f"{args.temperature}")
    if not (math.isfinite(args.top_p) and 0 < args.top_p <= 1):
        p.error(f"--top_p must be in (0, 1], got {args.top_p}")
    allocator.configure()
    try:
        gen = (Generator.from_checkpoint(args.checkpoint) if args.checkpoint else
               Generator.from_workdir(args.workdir, merged=not args.unmerged))
        print(gen(args.prompt, max_tokens=args.max_tokens, temperature=args.temperature,
                  top_p=args.top_p, seed=args.seed, chat=args.chat))
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    st = gen.stats
    rate = (f"then {st['tokens_per_s']:.1f} tokens/s" if math.isfinite(st["tokens_per_s"]) else
            "too few new tokens for a rate")
    print(f"{st['prompt_tokens']} prompt tokens, {st['new_tokens']} new; first token after "
          f"{st['first_token_s']:.2f} s (compiling included on a first call), {rate}",
          file=sys.stderr)
    if st["new_tokens"] < min(3, args.max_tokens) and not args.chat:
        print("(the model ended its text at once: an instruction-tuned model answers a "
              "question asked with --chat)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
