"""Prediction with a trained model: `Predictor` (any photo size), photo pairs on disk (`photos`)."""

from dmjax.inference.photos import read_image
from dmjax.inference.predictor import FITS, Prediction, Predictor

__all__ = ["FITS", "Prediction", "Predictor", "read_image"]
