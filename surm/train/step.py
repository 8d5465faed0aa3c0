"""The jitted step builders: the train step (forward, backward, optimizer update, the checks a
checkpoint relies on) and the eval step, for any task (``surm.tasks``)."""
from __future__ import annotations

from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import optax

from surm import data, peft, tasks


def _all_finite(tree) -> jax.Array:
    """Whether every float in ``tree`` is finite (one boolean, computed on device). ``x * 0`` is
    0 where ``x`` is finite and NaN where it is not, so one float sum per leaf answers: a
    reduction XLA runs at memory speed, where ``isfinite(x).all()`` materialises a boolean
    array and reduces it through a slow reduce-window."""
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    if not leaves:
        return jnp.asarray(True)
    return jnp.isfinite(sum(jnp.sum(x * 0, dtype=jnp.float32) for x in leaves))


def initial_state(trainable, tx: optax.GradientTransformation, rng: jax.Array) -> dict:
    """The train step's state before its first step: ``step``, ``trainable``, ``opt_state``
    and the run's ``rng`` (each step folds the step number into it)."""
    return {"step": jnp.zeros((), jnp.int32), "trainable": trainable,
            "opt_state": tx.init(trainable), "rng": rng}


def make_step_fns(model, spec: peft.PeftSpec, tx: optax.GradientTransformation,
                  inputs: Callable[[dict], tuple], task: tasks.Task,
                  data_spec: data.DatasetSpec | None = None,
                  lora_path: str | Mapping[str, str] = "auto",
                  eval_lora_path: str | Mapping[str, str] | None = None):
    """The (unjitted) train step ``(state, frozen, batch) -> (state, metrics)`` and eval step
    ``(trainable, frozen, batch) -> per-example outputs`` of a model under a PEFT spec.
    ``inputs``: the model call's positional inputs from a batch (its registry entry's
    ``inputs``); the loss and the eval reduction are the ``task``'s; ``lora_path`` (and
    ``eval_lora_path``, by default the same): how each lora-mode update is computed, best a plan
    made before tracing (``peft.plan_lora_paths``)."""
    if eval_lora_path is None:
        eval_lora_path = lora_path

    def train_step(state, frozen, batch):
        step_rng = jax.random.fold_in(state["rng"], state["step"])

        def loss_fn(tr):
            model_rng, adapter_rng = jax.random.split(step_rng)
            out = peft.apply(model, frozen, tr, spec, *inputs(batch), train=True,
                             rngs={"dropout": model_rng}, rng=adapter_rng,
                             lora_path=lora_path)
            return task.loss(out, batch, data_spec)

        loss, grads = jax.value_and_grad(loss_fn)(state["trainable"])
        grad_norm = optax.global_norm(grads)
        updates, opt_state = tx.update(grads, state["opt_state"], state["trainable"])
        new = {"step": state["step"] + 1, "rng": state["rng"], "opt_state": opt_state,
               "trainable": optax.apply_updates(state["trainable"], updates)}
        # The new parameters and optimizer state too: a finite gradient can still make them
        # NaN/Inf (a huge step, a NaN hyper-parameter), and a checkpoint holds only finite values.
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & _all_finite(
            (new["trainable"], new["opt_state"]))
        # The host reads ``finite`` before anything is saved or evaluated, and stops the run at
        # the first False: a non-finite state is never written. (Selecting the old state here
        # instead would keep both states alive and cost a full pass over them.)
        return new, {"loss": loss, "grad_norm": grad_norm, "finite": finite}

    def eval_step(trainable, frozen, batch):
        out = peft.apply(model, frozen, trainable, spec, *inputs(batch),
                         lora_path=eval_lora_path)
        return task.eval_outputs(out, batch)

    return train_step, eval_step
