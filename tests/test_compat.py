"""A run saved by the code before the package was restructured (tests/data/README.md) still
restores, predicts exactly as it did, and gives back the whole state a resumed run needs."""

import os

import jax
import numpy as np
import pytest
from conftest import REPO

from dmjax import checkpoints, inference, train

SAVED = os.path.join(REPO, "tests", "data", "workdir_before_restructure")


# `auto` changed on purpose since (dmjax.inference.cascade's two passes); the model did not.
@pytest.mark.parametrize("fit", ["resize", "pad"])
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


def test_the_whole_training_state_restores_as_a_resumed_run_restores_it(tiny_data_config):
  """Model, optimizer state, step, RNG and the data iterator, through the call training's resume
  makes (`train.train_and_evaluate`). Training on from there was checked once, not here:
  compiling this model's step would cost CI most of a minute."""
  from dmjax import models, parallel
  from dmjax.data import pipeline

  config, saved_variables, _ = checkpoints.restore_model(SAVED)
  config.data.tfds_dir = tiny_data_config.data.tfds_dir  # The same scenes, built here.
  model = models.create_model(config.model)
  state = train.create_train_state(config, model, train.create_optimizer(config),
                                   jax.random.PRNGKey(config.seed))
  iterator = pipeline.create_train_iterator(config, process_index=0, process_count=1)
  manager = checkpoints.create_manager(SAVED, read_only=True)
  model_item, train_item, data_restored = checkpoints.restore(
      manager, 2, model=state.variables, train=train.split_state(state)[1],
      data_iterator=iterator, sharding=parallel.replicated(parallel.create_mesh()))
  restored = train.join_state(model_item, train_item)
  assert int(restored.step) == 2 and data_restored
  for new, old in zip(jax.tree.leaves(restored.variables), jax.tree.leaves(saved_variables),
                      strict=True):
    np.testing.assert_array_equal(np.asarray(new), old)
  # The iterator continues after the 2 batches the saved run took: batch 3 of a fresh stream.
  fresh = pipeline.create_train_iterator(config, process_index=0, process_count=1)
  expected = [next(fresh) for _ in range(3)][-1]
  got = next(iterator)
  for key in expected:
    np.testing.assert_array_equal(got[key], expected[key])
