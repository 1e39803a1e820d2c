"""A run saved by the code before the package was restructured (tests/data/README.md) still
restores, predicts exactly as it did, and resumes training."""

import os
import shutil

import jax
import numpy as np
import pytest
from conftest import REPO

from dmjax import checkpoints, inference, train

SAVED = os.path.join(REPO, "tests", "data", "workdir_before_restructure")


@pytest.fixture
def saved_workdir(tmp_path):
  """A writable copy: resuming adds checkpoints, and the fixture must stay as it was saved."""
  workdir = tmp_path / "run"
  shutil.copytree(os.path.join(SAVED, "checkpoints"), workdir / "checkpoints")
  return str(workdir)


@pytest.mark.parametrize("fit", inference.FITS)
def test_predictions_are_those_the_old_code_made(fit):
  saved = np.load(os.path.join(SAVED, "predictions.npz"))
  predictor = inference.Predictor.from_workdir(SAVED, fit=fit)
  assert predictor.step == 2
  mask, depth = predictor(saved["bg"], saved["fg_bg"])
  np.testing.assert_allclose(mask, saved[f"{fit}_mask"], atol=1e-6)
  np.testing.assert_allclose(depth, saved[f"{fit}_depth"], atol=1e-6)


def test_the_saved_config_restores_in_todays_keys():
  config, _, step = checkpoints.restore_model(SAVED)
  assert step == 2 and config.model.refiner and config.model.width == 2
  # The keys of today's base config are all there (a saved config predates some of them).
  from dmjax import config as config_lib

  def keys(c, prefix=""):
    for k, v in c.items():
      yield from keys(v, f"{prefix}{k}.") if hasattr(v, "items") else [prefix + k]

  assert set(keys(config_lib.base_config())) <= set(keys(config))


@pytest.mark.slow
def test_training_resumes_from_the_saved_run(saved_workdir, tiny_data_config):
  config, _, _ = checkpoints.restore_model(saved_workdir)
  config.data.tfds_dir = tiny_data_config.data.tfds_dir  # The same scenes, built here.
  config.num_train_steps = 3
  results = train.train_and_evaluate(config, saved_workdir)
  assert sorted(os.listdir(os.path.join(saved_workdir, "checkpoints"))) == ["2", "3"]
  assert np.isfinite(results["mask_iou"])
  _, variables, step = checkpoints.restore_model(saved_workdir)
  _, old_variables, _ = checkpoints.restore_model(SAVED)
  assert step == 3
  pairs = zip(jax.tree.leaves(variables), jax.tree.leaves(old_variables), strict=True)
  assert any(not np.array_equal(new, old) for new, old in pairs)  # It trained a step.
