"""Weights of the original PyTorch models as Flax variables, saved as a dmjax run
(`import_state_dict`; the command is `dmjax.import_torch`).

The weights become step 0 of a workdir with that model's config, so evaluation and prediction
read it like any training run. Models and the original code they come from (their state-dict
key names are kept; MODELS.md and /work/shared/models list them):

  depthmasknet  seed 002's DepthMaskNet (SPEC §1), the default
  unet_dual     seed 004, mpaditya S15/model_1.py (MODELS.md §1)
  u2netp_dual   seed 003, santhiya-v models/u2net.py U2NETP (MODELS.md §2)

The config records how the seed fed its model (`model.input_norm`) and the resolution of its last
training stage (`data.resolution`), which prediction resizes to. `convert_state_dict` does the
mapping alone: PyTorch's (out, in, kh, kw) conv kernels become Flax's (kh, kw, in, out), its
(in, out, kh, kw) transposed-conv kernels (kh, kw, in, out), BatchNorm weight/bias become
scale/bias, running statistics go to `batch_stats`.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import traverse_util

from dmjax import config as config_lib
from dmjax import errors, models
from dmjax.models import depthmasknet

_STEMS = (("bg", "bg_stem"), ("bg_fg", "fg_bg_stem"))
_NUM_BLOCKS = len(depthmasknet.ENCODER_FEATURES)
_TASKS = ("mask", "depth")
# A wrapper such as nn.DataParallel saves every key with this prefix.
_WRAPPER_PREFIX = "module."


def _conv(torch_prefix: str, flax_path: tuple[str, ...]) -> dict[str, tuple]:
  return {f"{torch_prefix}.weight": ("params", *flax_path, "kernel")}


def _batch_norm(torch_prefix: str, flax_path: tuple[str, ...]) -> dict[str, tuple]:
  return {
      f"{torch_prefix}.weight": ("params", *flax_path, "scale"),
      f"{torch_prefix}.bias": ("params", *flax_path, "bias"),
      f"{torch_prefix}.running_mean": ("batch_stats", *flax_path, "mean"),
      f"{torch_prefix}.running_var": ("batch_stats", *flax_path, "var"),
  }


# What each importable model was in the original, for messages.
ORIGINALS = {"depthmasknet": "the seed DepthMaskNet", "unet_dual": "seed 004's U-Net dual decoder",
             "u2netp_dual": "seed 003's U2NETP"}
# model.* settings of the imported run: how the seed fed its photos (and which activation ran).
MODEL_SETTINGS = {"depthmasknet": {},
                  "unet_dual": {"input_norm": "unit", "decoder_activation": "leaky_relu"},
                  "u2netp_dual": {"input_norm": "image_max"}}
# The resolution of each seed's last training stage. Seed 002: 64 -> 112 -> 192 (SPEC §5). Seed
# 003: 64 -> 96 -> 112 -> 224 (MODELS.md §2.6). Seed 004 stored Resize((192, 192)), but its
# logged run was at 64 px (MODELS.md §1.8: its summary, plots and throughput).
FINAL_RESOLUTIONS = {"depthmasknet": 192, "unet_dual": 64, "u2netp_dual": 224}

# Flax leaf name -> PyTorch parameter or buffer name.
_LEAF_NAMES = {"kernel": "weight", "transpose_kernel": "weight", "bias": "bias", "scale": "weight",
               "mean": "running_mean", "var": "running_var"}


def torch_to_flax_keys(model_name: str = "depthmasknet") -> dict[str, tuple[str, ...]]:
  """The original's state-dict key -> the (collection, *module path, name) of its Flax twin."""
  if model_name != "depthmasknet":
    return _keys_from_module_names(model_name)
  return _depthmasknet_keys()


def _keys_from_module_names(model_name: str) -> dict[str, tuple[str, ...]]:
  """For models whose Flax modules carry the original's names, `.N` written `_N`
  (`encoder/layer3_0/shortcut_1/scale` <- `encoder.layer3.0.shortcut.1.weight`)."""
  keys = {}
  for path in _flax_shapes(model_name):
    *modules, leaf = path[1:]
    torch_modules = [re.sub(r"_(\d+)$", r".\1", module) for module in modules]
    keys[".".join([*torch_modules, _LEAF_NAMES[leaf]])] = path
  return keys


def _depthmasknet_keys() -> dict[str, tuple[str, ...]]:
  keys = {}
  for torch_name, flax_name in _STEMS:
    keys |= _conv(f"{torch_name}.0", (flax_name, "conv"))
    keys |= _batch_norm(f"{torch_name}.1", (flax_name, "bn"))
  keys |= _conv("pointwise", ("merge",))
  for k in range(1, _NUM_BLOCKS + 1):
    block = f"encode{k}"
    keys |= _conv(f"{block}.normalconv.0", (block, "normalconv", "conv"))
    keys |= _batch_norm(f"{block}.normalconv.1", (block, "normalconv", "bn"))
    keys |= _conv(f"{block}.dilatedconv.0", (block, "dilatedconv", "conv"))
    keys |= _batch_norm(f"{block}.dilatedconv.2", (block, "dilatedconv", "bn"))
    keys |= _conv(f"{block}.Pointwise", (block, "pointwise"))
  for task in _TASKS:
    for k in range(1, _NUM_BLOCKS + 1):
      keys |= _conv(f"{task}_decode{k}.Pointwise", (f"{task}_decode{k}", "pointwise"))
    keys |= _conv(f"{task}_outputConv", (f"{task}_output",))
  return keys


@functools.cache
def _flax_shapes(model_name: str = "depthmasknet") -> dict[tuple[str, ...], tuple[int, ...]]:
  """Shape of every variable of the Flax model, keyed by its flattened path."""
  images = jnp.zeros((1, 16, 16, 3), jnp.float32)
  model = models.MODELS[model_name]()
  variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), images, images))
  return {path: leaf.shape for path, leaf in traverse_util.flatten_dict(variables).items()}


# Flax kernel (kh, kw, in, out) -> PyTorch: Conv2d (out, in, kh, kw), ConvTranspose2d
# (in, out, kh, kw). `array.transpose(*_TO_FLAX[leaf])` goes the other way.
_TO_TORCH = {"kernel": (3, 2, 0, 1), "transpose_kernel": (2, 3, 0, 1)}
_TO_FLAX = {"kernel": (2, 3, 1, 0), "transpose_kernel": (2, 3, 0, 1)}


def _torch_shape(flax_path: tuple[str, ...], flax_shape: tuple[int, ...]) -> tuple[int, ...]:
  order = _TO_TORCH.get(flax_path[-1])
  return flax_shape if order is None else tuple(flax_shape[i] for i in order)


def _as_numpy(value: Any) -> np.ndarray:
  if hasattr(value, "detach"):  # A torch.Tensor; avoids importing torch here.
    value = value.detach().cpu().numpy()
  return np.asarray(value, dtype=np.float32)


def convert_state_dict(state_dict: Mapping[str, Any],
                       model_name: str = "depthmasknet") -> dict[str, dict]:
  """Maps an original model's state dict to Flax variables {"params", "batch_stats"}.

  Values may be torch tensors or anything numpy converts; the result holds float32 numpy
  arrays. `num_batches_tracked` entries are ignored. Raises ValueError naming the key for an
  unknown, missing or mis-shaped entry.
  """
  if state_dict and all(key.startswith(_WRAPPER_PREFIX) for key in state_dict):
    state_dict = {key[len(_WRAPPER_PREFIX):]: value for key, value in state_dict.items()}
  if model_name not in ORIGINALS:
    raise errors.UserError(f"model {model_name!r}: weights import for {sorted(ORIGINALS)} only")
  key_map = torch_to_flax_keys(model_name)
  flax_shapes = _flax_shapes(model_name)
  flat = {}
  for key, value in state_dict.items():
    if key.endswith("num_batches_tracked"):
      continue
    if key not in key_map:
      raise errors.UserError(f"state dict key {key!r} is not a weight of {ORIGINALS[model_name]}")
    flax_path = key_map[key]
    expected = _torch_shape(flax_path, flax_shapes[flax_path])
    array = _as_numpy(value)
    if array.shape != expected:
      raise errors.UserError(f"state dict key {key!r}: expected shape {expected}, got "
                             f"{array.shape}")
    order = _TO_FLAX.get(flax_path[-1])
    flat[flax_path] = array if order is None else np.ascontiguousarray(array.transpose(order))
  for key, flax_path in key_map.items():
    if flax_path not in flat:
      expected = _torch_shape(flax_path, flax_shapes[flax_path])
      raise errors.UserError(f"state dict lacks key {key!r} (expected shape {expected})")
  return traverse_util.unflatten_dict(flat)


def load_state_dict(state_dict_path: str) -> Mapping[str, Any]:
  """Reads a .pth state dict with torch.load (CPU, weights only)."""
  try:
    import torch
  except ImportError as e:
    raise errors.UserError("reading a PyTorch state dict needs torch: pip install "
                           "'dmjax[torch]'") from e
  if not os.path.isfile(state_dict_path):
    raise FileNotFoundError(f"{state_dict_path}: no such file")
  try:
    loaded = torch.load(state_dict_path, map_location="cpu", weights_only=True)
  except Exception as e:  # torch raises several types for unreadable or unsafe files.
    raise errors.UserError(f"{state_dict_path}: not a readable PyTorch state dict ({e})") from e
  # Training scripts often save {"state_dict": ..., "optimizer": ...} instead of the bare dict.
  if isinstance(loaded, Mapping) and isinstance(loaded.get("state_dict"), Mapping):
    loaded = loaded["state_dict"]
  if not isinstance(loaded, Mapping):
    raise errors.UserError(f"{state_dict_path}: holds a {type(loaded).__name__}, not a state dict")
  return loaded


def imported_config(model_name: str):
  """The config of an imported run: the model as the seed ran it, at its last resolution."""
  config = config_lib.base_config()
  config.model.name = model_name
  config.model.update(MODEL_SETTINGS[model_name])
  config.data.resolution = FINAL_RESOLUTIONS[model_name]
  return config


def import_state_dict(state_dict_path: str, workdir: str, model_name: str = "depthmasknet") -> None:
  """Converts a seed model's .pth file and saves it as step 0 of `workdir`."""
  from dmjax import checkpoints  # Orbax is only needed here, not for convert_state_dict.

  if model_name not in ORIGINALS:  # Before reading a large file.
    raise errors.UserError(f"--model={model_name}: weights import for {sorted(ORIGINALS)} only")
  variables = convert_state_dict(load_state_dict(state_dict_path), model_name)
  checkpoints.save_imported_model(workdir, imported_config(model_name), variables)
  num_params = sum(leaf.size for leaf in jax.tree.leaves(variables["params"]))
  logging.info("Imported %d parameters from %s into %s", num_params, state_dict_path, workdir)
