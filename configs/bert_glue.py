"""BERT on a GLUE task (tensorflow-datasets glue/<task>, prepared in input.data_dir).

The authors' GLUE settings (SURM_NOTES): AdamW, weight decay 0.25 (none on biases and
LayerNorms), linear schedule with 6% warm-up, batch 64, max length 128, adapter dropout 0.15,
GELU; metrics MCC (CoLA), F1 (MRPC, QQP), Spearman/Pearson (STS-B), accuracy elsewhere. The
authors trained everything at lr 2e-3; here each method's lr and head lr default to the ones the
study chose for it on validation on MiniLM-L6 text (surm/tuned_lrs.json; ``lr=2e-3,head_lr=2e-3``
gives the authors'). Tune them per task with a sweep (docs/EXPERIMENTS.md).

    python -m surm.train --config configs/bert_glue.py:task=sst2,checkpoint=/path/bert-base-uncased \\
        --workdir runs/sst2 --config.input.data_dir=~/tensorflow_datasets

checkpoint: a Hugging Face folder (config.json, model.safetensors, tokenizer.json), "minilm_l6"
(offline), or "random" (a tiny random BERT for smoke tests, with the MiniLM tokenizer).
Arguments: task, checkpoint, family, mode, targets, rank, block_size, form, factors (kronecker
AxB), alpha, scale (see configs/default.py), seed, steps, batch, lr, head_lr, max_length,
shots.
"""
from surm import config_args


def get_config(arg=None):
    a = config_args.parse(arg, task="sst2", checkpoint="minilm_l6", family="circulant",
                          mode="adapter", targets="", rank=None, block_size=None, factors="",
                          form=None, alpha=None, scale=None, seed=0, steps=5000, batch=64,
                          lr=None, head_lr=None, max_length=128, shots=0, pooling="pooler")
    c = config_args.ml_collections.ConfigDict()
    c.seed = a.seed
    c.total_steps = a.steps
    c.eval_every = 1000
    c.ckpt_every = 1000
    c.keep_checkpoints = 2
    c.restore_step = 0  # resume from this kept step (later ones are deleted); 0: the latest
    c.log_every = 50

    c.model = dict(name="bert", checkpoint=a.checkpoint, pooling=a.pooling, dtype="float32",
                   bert=dict(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)
                   if a.checkpoint == "random" else {})
    c.input = dict(dataset=f"glue/{a.task}", data_dir="", batch_size=a.batch,
                   eval_batch_size=128, max_length=a.max_length, shots=a.shots,
                   validation_examples=0, test_examples=0, num_workers=0)
    c.peft = config_args.peft_block(a, dropout=0.15)
    c.optimizer = dict(name="adamw", **config_args.learning_rates(a, "text"), weight_decay=0.25,
                       b1=0.9,
                       b2=0.999, momentum=0.9, grad_clip=1.0, schedule="linear",
                       warmup_frac=0.06)
    c.mesh = dict(data=-1, fsdp=1, model=1)
    return c
