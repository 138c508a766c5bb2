"""What a task gives the shared trainer: its model, loss, optimizer and data.

The trainer (mae_jax/trainer) owns everything else: the mesh, the train state and its
shardings, restoring or `init_from`, the jitted step with accumulation and donation, the
loop with preemption, non-finite checks, metrics, checkpoints and evaluators.
"""
from __future__ import annotations

import abc
import json
from typing import Any, NamedTuple, Sequence

import grain
import jax
import jax.numpy as jnp
import ml_collections
import optax

from mae_jax.data import pipeline

Params = Any  # a pytree of float32 arrays, the trained parameters
ModelState = dict[str, Any]  # what the model carries but is not trained ({} for most tasks)
Batch = dict[str, jax.Array]


def field_diff(saved: dict[str, Any], current: dict[str, Any], free: Sequence[str] = ()
               ) -> dict[str, tuple[Any, Any]]:
  """{field: (saved, current)} for each field of `saved` that `current` holds otherwise, the
  `free` ones aside. Both JSON-normalised (tuples as lists), as a checkpoint stores them."""
  current = json.loads(json.dumps(current))
  return {k: (v, current.get(k)) for k, v in json.loads(json.dumps(saved)).items()
          if k not in free and current.get(k) != v}


class Aux(NamedTuple):
  """The second output of a task's loss function."""
  metrics: dict[str, jax.Array]  # scalars, averaged over gradient-accumulation micro-batches
  model_state: ModelState  # the updated model state (e.g. BatchNorm statistics)


class Task(abc.ABC):
  """A trainable task. Subclasses set `name` and implement the abstract methods.

  `loss_fn(params, model_state, batch, rng) -> (loss, Aux)` is differentiated with respect
  to `params` only; `model_state` holds what is carried without gradients (BatchNorm
  statistics, a frozen encoder). Batches are dicts of global arrays with `batch_keys`.
  """

  name: str
  batch_keys: tuple[str, ...] = ("image",)

  def __init__(self, config: ml_collections.ConfigDict):
    self.config = config

  # --- The model. ---
  @abc.abstractmethod
  def model_dict(self) -> dict[str, Any]:
    """The architecture, saved with every checkpoint; a resumed run must have the same."""

  @abc.abstractmethod
  def init(self, rng: jax.Array) -> tuple[Params, ModelState]:
    """Freshly initialised (params, model_state)."""

  def load_init(self, path: str) -> Any:
    """Reads `config.init_from` (before anything is written); checks it fits this model."""
    raise ValueError(f"task {self.name!r} does not take config.init_from")

  def class_names(self) -> list[str] | None:
    """The names of the classes a classifying task learns, in label order, as its training
    data names them (saved with each checkpoint, so exports label their outputs); None for
    tasks that do not classify, or data without names. Known once `train_source` ran."""
    return None

  def apply_init(self, loaded: Any, params: Params, model_state: ModelState
                 ) -> tuple[Params, ModelState]:
    """Puts what `load_init` read into freshly initialised (params, model_state). Runs
    inside the jitted function that builds the state (`loaded`'s arrays are traced): host
    work on the loaded weights belongs in `load_init`."""
    raise NotImplementedError

  # --- The loss. ---
  def prepare_batch(self, batch: Batch, rng: jax.Array) -> Batch:
    """Whole-batch randomness (e.g. MAE's masking noise), drawn once per step before the
    batch is split into accumulation micro-batches, so that accumulating changes nothing."""
    del rng
    return batch

  @abc.abstractmethod
  def loss_fn(self, params: Params, model_state: ModelState, batch: Batch, rng: jax.Array
              ) -> tuple[jax.Array, Aux]:
    """Scalar loss and Aux for one (micro-)batch."""

  # --- The optimizer. ---
  @abc.abstractmethod
  def optimizer(self, peak_lr: float, warmup_steps: int, total_steps: int
                ) -> tuple[optax.Schedule, optax.GradientTransformation]:
    """(lr schedule, optimizer) of the recipe for a run of `total_steps`."""

  # --- The data. ---
  def train_source(self) -> grain.sources.RandomAccessDataSource:
    return pipeline.make_source(self.config.input, self.config.input.split)

  def train_loader(self, source: grain.sources.RandomAccessDataSource, start_batch: int = 0
                   ) -> grain.IterDataset:
    """This host's parts of global batches start_batch, start_batch + 1, ... (a run at step
    k reads batch k next, on any number of hosts and loader workers)."""
    return pipeline.make_train_loader(
        self.config.input, image_size=self.image_size, global_batch_size=self.config.batch_size,
        seed=self.config.seed, start_batch=start_batch, source=source)

  @property
  @abc.abstractmethod
  def image_size(self) -> int:
    """Side of the square input images."""

  def batch_shapes(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
    """Shapes of a global batch of `batch_size` as the loader makes it (`batch_keys` of
    [B, H, W, 3] images, float32 or uint8 (`input.normalize_on_device`), and int32 [B]
    labels), for ahead-of-time compilation."""
    s = self.image_size
    image_dtype = pipeline.train_image_dtype(self.config.input)
    shapes = {"image": jax.ShapeDtypeStruct((batch_size, s, s, 3), image_dtype),
              "label": jax.ShapeDtypeStruct((batch_size,), jnp.int32)}
    return {k: shapes[k] for k in self.batch_keys}

  def flops_per_example(self) -> float | None:
    """Model FLOPs of one training example (for MFU), or None when not known."""
    return None

  # --- What evaluators use. ---
  def features(self, params: Params, model_state: ModelState, images: jax.Array,
               pool: str = "cls") -> jax.Array:
    """[B, H, W, C] -> [B, D] encoder features (kNN), pooled as `mae.features`."""
    raise ValueError(f"task {self.name!r} has no features for kNN")

  def logits(self, params: Params, model_state: ModelState, images: jax.Array) -> jax.Array:
    """[B, H, W, C] -> [B, num_classes] (classification accuracy)."""
    raise ValueError(f"task {self.name!r} does not classify")
