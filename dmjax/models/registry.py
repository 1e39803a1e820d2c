"""Models by name: each model module registers its Linen module (`@register("name")`), and
`create_model(config.model)` builds the one a config names (with the refiner around it when
`config.model.refiner`). Also the calling conventions every model shares: inference
(`predict_probabilities`) and the extra arguments of a training step (`train_inputs`).
"""


from __future__ import annotations

import dataclasses
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from dmjax import errors
from dmjax.models import refiner

MODELS: dict[str, Callable[..., nn.Module]] = {}


def register(name: str):
  def wrap(cls):
    MODELS[name] = cls
    return cls

  return wrap


def create_model(model_config: ml_collections.ConfigDict) -> nn.Module:
  if model_config.name not in MODELS:
    raise errors.UserError(f"config.model.name={model_config.name!r}: unknown model; known: "
                           f"{sorted(MODELS)}")
  cls = MODELS[model_config.name]
  # Options of other models (e.g. `blur` for the seed model) do not apply and are left out.
  fields = {f.name for f in dataclasses.fields(cls)}
  kwargs = {k: v for k, v in model_config.items() if k in fields}
  kwargs["dtype"] = jnp.dtype(model_config.get("dtype", "float32"))
  if model_config.get("refiner", False):  # Absent from configs saved before it existed.
    base = cls(**kwargs)
    if getattr(base, "uses_teacher_forcing", False):
      # The refined model does not pass the labels through to its base.
      raise errors.UserError(f"config.model.teacher_forcing_steps: {model_config.name}'s teacher "
                             "forcing needs config.model.refiner=False")
    return refiner.Refined(base=base, features=int(model_config.refiner_features),
                           train_window=int(model_config.get("refiner_window", 0)),
                           dtype=kwargs["dtype"])
  return cls(**kwargs)


def predict_probabilities(model: nn.Module, variables, bg: jax.Array,
                          fg_bg: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Mask probability and depth in [0, 1], float32, from a model in inference mode."""
  outputs = model.apply(variables, bg, fg_bg, train=False)
  return jax.nn.sigmoid(outputs["mask"]), jax.nn.sigmoid(outputs["depth"])


# Folded into the train state's key for the teacher-forcing draws, apart from other streams.
_TEACHER_FORCING_STREAM = 0x7EAC4E


def train_inputs(model: nn.Module, batch, rng: jax.Array, step: jax.Array) -> dict:
  """Extra `model.apply` arguments of a training step: the ground-truth mask, the step and an rng
  for a model that feeds labels to its second stage (two_stage's teacher forcing); else none."""
  if not getattr(model, "uses_teacher_forcing", False):
    return {}
  key = jax.random.fold_in(jax.random.fold_in(rng, _TEACHER_FORCING_STREAM), step)
  return {"mask_label": batch["mask"], "step": step, "rngs": {"teacher_forcing": key}}


