"""Models by name. `create_model(config.model)` builds the one a config names.

Every model is a Linen module called as `model.apply(variables, bg, fg_bg, train=...)` on NHWC
float inputs (H, W divisible by 16) and returns `{"mask": logits, "depth": logits}`, each
float32 of shape (B, H, W, 1). Variables are `{"params", "batch_stats"}`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

MODELS: dict[str, Callable[..., nn.Module]] = {}


def register(name: str):
  def wrap(cls):
    MODELS[name] = cls
    return cls

  return wrap


def create_model(model_config: ml_collections.ConfigDict) -> nn.Module:
  if model_config.name not in MODELS:
    raise ValueError(f"config.model.name={model_config.name!r}: unknown model; known: "
                     f"{sorted(MODELS)}")
  cls = MODELS[model_config.name]
  # Options of other models (e.g. `blur` for the seed model) do not apply and are left out.
  fields = {f.name for f in dataclasses.fields(cls)}
  kwargs = {k: v for k, v in model_config.items() if k in fields}
  kwargs["dtype"] = jnp.dtype(model_config.get("dtype", "float32"))
  return cls(**kwargs)


def predict_probabilities(model: nn.Module, variables, bg: jax.Array,
                          fg_bg: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Mask probability and depth in [0, 1], float32, from a model in inference mode."""
  outputs = model.apply(variables, bg, fg_bg, train=False)
  return jax.nn.sigmoid(outputs["mask"]), jax.nn.sigmoid(outputs["depth"])


# Imported last: each model module registers itself with `register`, defined above.
from dmjax.models import depthmasknet, depthmasknet_v2  # noqa: E402, F401
