"""Train state and the one jitted, sharded train step every task uses.

The step takes a task's `loss_fn(params, model_state, batch, rng) -> (loss, Aux)`, averages
gradients over `grad_accum_steps` micro-batches, applies the optimizer, and returns the new
state (donated) and replicated scalar metrics.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from mae_jax import sharding
from mae_jax.data import pipeline
from mae_jax.tasks.base import Batch, Task

# {'step': int32 [], 'params', 'opt_state'} and 'model_state' when the task has one (a
# pretraining state has none, so workdirs written before model states existed still resume).
State = dict[str, Any]
Metrics = dict[str, jax.Array]


def init_state(task: Task, tx: optax.GradientTransformation, rng: jax.Array) -> State:
  params, model_state = task.init(rng)
  state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}
  if model_state:
    state["model_state"] = model_state
  return state


def abstract_state(task: Task, tx: optax.GradientTransformation) -> State:
  """ShapeDtypeStructs of the train state, without allocating it."""
  return jax.eval_shape(functools.partial(init_state, task, tx), jax.random.key(0))


def create_state(task: Task, tx: optax.GradientTransformation, rng: jax.Array,
                 mesh: Mesh) -> State:
  """Initialises the train state directly in its shardings."""
  out = sharding.tree_sharding(mesh, abstract_state(task, tx))
  return jax.jit(functools.partial(init_state, task, tx), out_shardings=out)(rng)


def check_batch(batch_size: int, num_devices: int, grad_accum_steps: int) -> None:
  """Start-up check: the global batch must split evenly over devices and micro-steps."""
  if grad_accum_steps < 1:
    raise ValueError(f"grad_accum_steps must be >= 1, got {grad_accum_steps}")
  if batch_size % (num_devices * grad_accum_steps):
    raise ValueError(
        f"global batch size {batch_size} is not divisible by the {num_devices} devices x "
        f"{grad_accum_steps} gradient accumulation steps; pick a multiple of "
        f"{num_devices * grad_accum_steps}")


def make_train_step(task: Task, tx: optax.GradientTransformation, schedule: optax.Schedule,
                    mesh: Mesh, abstract: State, *, grad_accum_steps: int = 1, seed: int = 0
                    ) -> Callable[[State, Batch], tuple[State, Metrics]]:
  """Returns jitted `step(state, batch) -> (state, metrics)`; `state` is donated.

  batch: dict of global arrays, leading axis [B] sharded over the mesh; uint8 images
  (`input.normalize_on_device`) are normalised first, on the device. The step's rng is
  the seed folded with the step number; `task.prepare_batch` draws the whole batch's
  randomness from it, then the batch is split into `grad_accum_steps` micro-batches whose
  gradients are averaged (micro-batch i gets the rng folded with i): 2 x B/2 gives the
  update of 1 x B. The model state is threaded through the micro-batches in order.
  """
  state_shardings = sharding.tree_sharding(mesh, abstract)
  k = grad_accum_steps
  grad_fn = jax.value_and_grad(task.loss_fn, has_aux=True)

  def micro(x):
    # [B, ...] -> [k, B/k, ...] taking every k-th example, so each device keeps its rows.
    return jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1)

  def step(state, batch):
    rng = jax.random.fold_in(jax.random.key(seed), state["step"])
    batch = {**batch, "image": pipeline.device_images(batch["image"], task.config.input)}
    batch = task.prepare_batch(batch, rng)
    params, model_state = state["params"], state.get("model_state", {})
    if k == 1:
      (loss, aux), grads = grad_fn(params, model_state, batch, jax.random.fold_in(rng, 0))
      model_state, task_metrics = aux.model_state, aux.metrics
    else:
      def accumulate(carry, xs):
        sums, model_state = carry
        i, micro_batch = xs
        (loss, aux), grads = grad_fn(params, model_state, micro_batch,
                                     jax.random.fold_in(rng, i))
        sums = jax.tree.map(jnp.add, sums, (loss, grads, aux.metrics))
        return (sums, aux.model_state), None
      shapes = jax.eval_shape(grad_fn, params, model_state,
                              jax.tree.map(lambda x: x[:x.shape[0] // k], batch), rng)
      (_, aux_shapes), _ = shapes
      zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params),
               jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), aux_shapes.metrics))
      (sums, model_state), _ = jax.lax.scan(
          accumulate, (zeros, model_state), (jnp.arange(k), jax.tree.map(micro, batch)))
      loss, grads, task_metrics = jax.tree.map(lambda x: x / k, sums)
    updates, opt_state = tx.update(grads, state["opt_state"], params)
    new_params = optax.apply_updates(params, updates)
    new_state = {"step": state["step"] + 1, "params": new_params, "opt_state": opt_state}
    if "model_state" in state:
      new_state["model_state"] = model_state
    # param_norm is of the updated params: a finite value means the state is safe to save.
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads),
               "param_norm": optax.tree.norm(new_params), "lr": schedule(state["step"]),
               **task_metrics}
    return new_state, metrics

  return jax.jit(step, in_shardings=(state_shardings, sharding.batch_sharding(mesh)),
                 out_shardings=(state_shardings, sharding.replicated(mesh)), donate_argnums=0)
