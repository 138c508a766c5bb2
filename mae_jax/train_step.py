"""Train state and the jitted, sharded MAE train step (with gradient accumulation)."""
from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from mae_jax import sharding
from mae_jax.config import ModelConfig
from mae_jax.mae import forward, init_params

State = dict[str, Any]  # {'step': int32 [], 'params': ..., 'opt_state': ...}
Metrics = dict[str, jax.Array]


def _init_state(model: ModelConfig, tx: optax.GradientTransformation, rng: jax.Array) -> State:
  params = init_params(model, rng)
  return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}


def abstract_state(model: ModelConfig, tx: optax.GradientTransformation) -> State:
  """ShapeDtypeStructs of the train state, without allocating it."""
  return jax.eval_shape(functools.partial(_init_state, model, tx), jax.random.key(0))


def create_state(model: ModelConfig, tx: optax.GradientTransformation, rng: jax.Array,
                 mesh: Mesh) -> State:
  """Initialises params and optimizer state directly in their shardings."""
  out = sharding.tree_sharding(mesh, abstract_state(model, tx))
  return jax.jit(functools.partial(_init_state, model, tx), out_shardings=out)(rng)


def check_batch(batch_size: int, num_devices: int, grad_accum_steps: int) -> None:
  """Start-up check: the global batch must split evenly over devices and micro-steps."""
  if grad_accum_steps < 1:
    raise ValueError(f"grad_accum_steps must be >= 1, got {grad_accum_steps}")
  if batch_size % (num_devices * grad_accum_steps):
    raise ValueError(
        f"global batch size {batch_size} is not divisible by the {num_devices} devices x "
        f"{grad_accum_steps} gradient accumulation steps; pick a multiple of "
        f"{num_devices * grad_accum_steps}")


def make_train_step(model: ModelConfig, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, mesh: Mesh, abstract: State, *,
                    grad_accum_steps: int = 1, seed: int = 0
                    ) -> Callable[[State, jax.Array], tuple[State, Metrics]]:
  """Returns jitted `step(state, images) -> (state, metrics)`; `state` is donated.

  images: [B, H, W, C] global batch sharded over the mesh. The masking noise of the whole
  batch is drawn from the seed folded with the step, then split into `grad_accum_steps`
  micro-batches whose gradients are averaged: 2 x B/2 gives the update of 1 x B.
  """
  state_shardings = sharding.tree_sharding(mesh, abstract)
  batch = sharding.batch_sharding(mesh)
  k = grad_accum_steps

  def loss_fn(params, images, noise):
    return forward(params, images, None, model, noise).loss

  grad_fn = jax.value_and_grad(loss_fn)

  def micro(x):
    # [B, ...] -> [k, B/k, ...] taking every k-th example, so each device keeps its rows.
    return jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1)

  def step(state, images):
    rng = jax.random.fold_in(jax.random.key(seed), state["step"])
    noise = jax.random.uniform(rng, (images.shape[0], model.num_patches))  # [B, N]
    params = state["params"]
    if k == 1:
      loss, grads = grad_fn(params, images, noise)
    else:
      def accumulate(carry, xs):
        loss, grads = grad_fn(params, *xs)
        return jax.tree.map(jnp.add, carry, (loss, grads)), None
      zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
      (loss, grads), _ = jax.lax.scan(accumulate, zeros, (micro(images), micro(noise)))
      loss, grads = jax.tree.map(lambda x: x / k, (loss, grads))
    updates, opt_state = tx.update(grads, state["opt_state"], params)
    new_params = optax.apply_updates(params, updates)
    new_state = {"step": state["step"] + 1, "params": new_params, "opt_state": opt_state}
    # param_norm is of the updated params: a finite value means the state is safe to save.
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads),
               "param_norm": optax.tree.norm(new_params), "lr": schedule(state["step"])}
    return new_state, metrics

  return jax.jit(step, in_shardings=(state_shardings, batch),
                 out_shardings=(state_shardings, sharding.replicated(mesh)), donate_argnums=0)
