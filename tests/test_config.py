"""The stage configs: every variant loads, bad arguments are refused, derived keys follow."""

import importlib.util
import os

import pytest

from dmjax import config as config_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(name: str, arg: str | None = None):
  spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "configs", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


@pytest.mark.parametrize("name", ["r64", "r112", "r192"])
@pytest.mark.parametrize("arg", [None, "data=seed,recipe=seed,schedule=full"])
def test_every_stage_and_variant_loads(name, arg):
  config = load_config(name, arg)
  assert config.data.resolution == int(name[1:])
  assert config.batch_size > 0 and config.num_train_steps > 0


def test_the_seed_recipe_is_the_seeds():
  config = load_config("r64", "recipe=seed,schedule=full")
  assert config.model.name == "depthmasknet"
  assert (config.optimizer.name, config.optimizer.learning_rate, config.optimizer.momentum,
          config.optimizer.weight_decay) == ("sgd", 0.01, 0.9, 1e-5)
  # Batch 512, 3 epochs of 280,000 examples: decay ×0.01 at each epoch's end.
  assert (config.batch_size, config.num_train_steps) == (512, 1640)
  assert config.optimizer.step_every == 546


def test_derived_keys_follow_an_overridden_length():
  config = load_config("r64", "recipe=seed,schedule=full")
  config.num_train_steps = 600
  assert config.optimizer.step_every == 200  # Still the thirds of the stage.
  assert (config.eval_every_steps, config.checkpoint_every_steps) == (60, 30)
  resolved = config.copy_and_resolve_references()
  config.num_train_steps = 900
  assert resolved.optimizer.step_every == 200  # A resolved copy is frozen, as saved ones are.


@pytest.mark.parametrize("arg", ["data=imagenet", "recipe=fast", "schedule=tpu", "size=64",
                                 "data"])
def test_bad_arguments_are_refused_naming_them(arg):
  with pytest.raises(ValueError, match=arg.split("=")[0]):
    config_lib.stage_config(64, arg)


def test_stages_feed_the_step_on_device_and_gpu_stages_compute_in_bfloat16():
  for name in ("r64", "r112", "r192"):
    cpu, full = load_config(name), load_config(name, "schedule=full")
    assert cpu.data.on_device and cpu.data.predecoded and cpu.model.dtype == "float32"
    assert full.data.on_device and full.model.dtype == "bfloat16"
    assert full.data.transfer_resolution == cpu.data.synthetic.resolution
  assert load_config("r64", "schedule=full").data.predecoded  # 16 GB; larger stages are not.
  assert not load_config("r192", "schedule=full").data.predecoded
  assert load_config("r64", "schedule=full,recipe=seed").model.dtype == "float32"
