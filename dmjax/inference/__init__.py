"""Prediction with a trained model: `Predictor` (any photo size), photo pairs on disk (`photos`)."""

import importlib

# Imported on first use, so that `dmjax.inference.exported` (a model file run with jax alone)
# loads where Flax, which `predictor` imports, is not installed.
_LAZY = {"CLEAN_MASK_HELP": "predictor", "FITS": "predictor", "FIT_HELP": "predictor",
         "Prediction": "predictor", "Predictor": "predictor", "read_image": "photos"}

__all__ = ["CLEAN_MASK_HELP", "FIT_HELP", "FITS", "Prediction", "Predictor", "read_image"]


def __getattr__(name: str):
  if name in _LAZY:
    return getattr(importlib.import_module(f"dmjax.inference.{_LAZY[name]}"), name)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
