"""Imports weights of the PyTorch seed DepthMaskNet into a dmjax workdir.

    python -m dmjax.import_torch --state_dict=model.pth --workdir=/tmp/seed_import

writes the weights as step 0 of `workdir` with a `depthmasknet` config, so evaluation and
prediction read it like any training run. `convert_state_dict` does the mapping alone: PyTorch's
(out, in, kh, kw) kernels become Flax's (kh, kw, in, out), BatchNorm weight/bias become
scale/bias, running statistics go to `batch_stats`.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from flax import traverse_util

from dmjax import config as config_lib
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


def torch_to_flax_keys() -> dict[str, tuple[str, ...]]:
  """The original's state-dict key -> the (collection, *module path, name) of its Flax twin."""
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
def _flax_shapes() -> dict[tuple[str, ...], tuple[int, ...]]:
  """Shape of every variable of the Flax DepthMaskNet, keyed by its flattened path."""
  images = jnp.zeros((1, 16, 16, 3), jnp.float32)
  variables = jax.eval_shape(
      lambda: depthmasknet.DepthMaskNet().init(jax.random.PRNGKey(0), images, images))
  return {path: leaf.shape for path, leaf in traverse_util.flatten_dict(variables).items()}


def _is_kernel(flax_path: tuple[str, ...]) -> bool:
  return flax_path[-1] == "kernel"


def _torch_shape(flax_path: tuple[str, ...], flax_shape: tuple[int, ...]) -> tuple[int, ...]:
  if _is_kernel(flax_path):  # HWIO -> OIHW.
    height, width, in_features, out_features = flax_shape
    return (out_features, in_features, height, width)
  return flax_shape


def _as_numpy(value: Any) -> np.ndarray:
  if hasattr(value, "detach"):  # A torch.Tensor; avoids importing torch here.
    value = value.detach().cpu().numpy()
  return np.asarray(value, dtype=np.float32)


def convert_state_dict(state_dict: Mapping[str, Any]) -> dict[str, dict]:
  """Maps the original DepthMaskNet's state dict to Flax variables {"params", "batch_stats"}.

  Values may be torch tensors or anything numpy converts; the result holds float32 numpy
  arrays. `num_batches_tracked` entries are ignored. Raises ValueError naming the key for an
  unknown, missing or mis-shaped entry.
  """
  if state_dict and all(key.startswith(_WRAPPER_PREFIX) for key in state_dict):
    state_dict = {key[len(_WRAPPER_PREFIX):]: value for key, value in state_dict.items()}
  key_map = torch_to_flax_keys()
  flax_shapes = _flax_shapes()
  flat = {}
  for key, value in state_dict.items():
    if key.endswith("num_batches_tracked"):
      continue
    if key not in key_map:
      raise ValueError(f"state dict key {key!r} is not a weight of the seed DepthMaskNet")
    flax_path = key_map[key]
    expected = _torch_shape(flax_path, flax_shapes[flax_path])
    array = _as_numpy(value)
    if array.shape != expected:
      raise ValueError(f"state dict key {key!r}: expected shape {expected}, got {array.shape}")
    flat[flax_path] = array.transpose(2, 3, 1, 0) if _is_kernel(flax_path) else array
  for key, flax_path in key_map.items():
    if flax_path not in flat:
      expected = _torch_shape(flax_path, flax_shapes[flax_path])
      raise ValueError(f"state dict lacks key {key!r} (expected shape {expected})")
  return traverse_util.unflatten_dict(flat)


def load_state_dict(state_dict_path: str) -> Mapping[str, Any]:
  """Reads a .pth state dict with torch.load (CPU, weights only)."""
  try:
    import torch
  except ImportError as e:
    raise ImportError("reading a PyTorch state dict needs torch: pip install 'dmjax[torch]'") from e
  if not os.path.isfile(state_dict_path):
    raise FileNotFoundError(f"{state_dict_path}: no such file")
  try:
    loaded = torch.load(state_dict_path, map_location="cpu", weights_only=True)
  except Exception as e:  # torch raises several types for unreadable or unsafe files.
    raise ValueError(f"{state_dict_path}: not a readable PyTorch state dict ({e})") from e
  # Training scripts often save {"state_dict": ..., "optimizer": ...} instead of the bare dict.
  if isinstance(loaded, Mapping) and isinstance(loaded.get("state_dict"), Mapping):
    loaded = loaded["state_dict"]
  if not isinstance(loaded, Mapping):
    raise ValueError(f"{state_dict_path}: holds a {type(loaded).__name__}, not a state dict")
  return loaded


def import_state_dict(state_dict_path: str, workdir: str) -> None:
  """Converts a seed DepthMaskNet .pth file and saves it as step 0 of `workdir`."""
  from dmjax import checkpoints  # Orbax is only needed here, not for convert_state_dict.

  variables = convert_state_dict(load_state_dict(state_dict_path))
  config = config_lib.base_config()
  config.model.name = "depthmasknet"
  checkpoints.save_imported_model(workdir, config, variables)
  num_params = sum(leaf.size for leaf in jax.tree.leaves(variables["params"]))
  logging.info("Imported %d parameters from %s into %s", num_params, state_dict_path, workdir)


def _define_flags() -> None:
  # Defined only when run as a program, so importing this module next to dmjax.main (which also
  # has --workdir) does not clash.
  flags.DEFINE_string("state_dict", None, "The seed model's .pth state dict.")
  flags.DEFINE_string("workdir", None, "Where to write the imported checkpoint (new or empty).")
  flags.mark_flags_as_required(["state_dict", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  try:
    import_state_dict(flags.FLAGS.state_dict, flags.FLAGS.workdir)
  except (ImportError, ValueError, OSError) as e:
    # Bad input is the user's to fix: one line, not a traceback.
    logging.debug("Traceback:", exc_info=True)
    raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
  _define_flags()
  app.run(main)
