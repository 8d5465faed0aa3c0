"""The jitted step builders: the train step (forward, backward, optimizer update, the checks a
checkpoint relies on) and the eval step, for any task (``surm.tasks``)."""
from __future__ import annotations

import functools
from typing import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import optax

from surm import data, peft, sharding, tasks
from surm.structured import partition


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


def rows_split_over(fn: Callable, mesh, axes: Sequence[str]) -> Callable:
    """``fn`` whose structured products, traced inside it, split their rows over ``axes``
    of ``mesh`` (``surm.structured.partition``; a fresh function, so no trace made outside
    the context is reused)."""
    @functools.wraps(fn)
    def split(*args, **kwargs):
        with partition.over_batch(mesh, axes):
            return fn(*args, **kwargs)
    return split


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


def state_shardings(state, frozen, mesh):
    """(the train state's shardings, the frozen base's): one rule table for the frozen base,
    the trainable parameters and the optimizer state alike: FSDP over ``fsdp``, Megatron pairs
    over ``model`` (``surm.sharding``)."""
    rules = sharding.rules(*peft.spec.tensor_parallel_patterns())
    return sharding.shardings(state, mesh, rules), sharding.shardings(frozen, mesh, rules)


def jit_steps(train_step, eval_step, mesh, state_sh, frozen_sh, batch_keys, eval_keys):
    """The train and eval steps jitted with explicit shardings: batches split over the data and
    fsdp axes, the state as ``state_sh``, the frozen base as ``frozen_sh``; the train step
    donates its state. Their structured products split over the batch as they are traced
    (XLA would gather the batch for their FFTs: ``surm.structured.partition``)."""
    repl, rows = sharding.replicated(mesh), sharding.batch_sharding(mesh)
    axes = sharding.batch_axes(mesh)
    train = jax.jit(rows_split_over(train_step, mesh, axes),
                    in_shardings=(state_sh, frozen_sh, {k: rows for k in batch_keys}),
                    out_shardings=(state_sh, repl), donate_argnums=(0,))
    evaluate = jax.jit(rows_split_over(eval_step, mesh, axes),
                       in_shardings=(state_sh["trainable"], frozen_sh,
                                     {k: rows for k in eval_keys}),
                       out_shardings=repl)
    return train, evaluate
