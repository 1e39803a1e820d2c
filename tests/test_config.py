"""The stage configs: every variant loads, bad arguments are refused, derived keys follow."""

import importlib.util
import json
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
@pytest.mark.parametrize("arg", [None, "data=original,recipe=original,schedule=full"])
def test_every_stage_and_variant_loads(name, arg):
  config = load_config(name, arg)
  # The default recipe refines: the stage's model sees half of the refined model's input.
  assert config.model.refiner == (arg is None)
  assert config.data.resolution == int(name[1:]) * (2 if config.model.refiner else 1)
  assert config.batch_size > 0 and config.num_train_steps > 0


def test_refiner_off_is_the_previous_default():
  config = load_config("r64", "refiner=off")
  assert not config.model.refiner
  assert (config.data.resolution, config.data.synthetic.resolution) == (64, 80)
  assert (config.batch_size, config.num_train_steps) == (32, 2400)
  with pytest.raises(ValueError, match="refiner"):
    load_config("r64", "refiner=maybe")


def test_the_original_recipe_is_the_originals():
  config = load_config("r64", "recipe=original,schedule=full")
  assert config.model.name == "depthmasknet"
  assert (config.optimizer.name, config.optimizer.learning_rate, config.optimizer.momentum,
          config.optimizer.weight_decay) == ("sgd", 0.01, 0.9, 1e-5)
  # Batch 512, 3 epochs of 280,000 examples: decay ×0.01 at each epoch's end.
  assert (config.batch_size, config.num_train_steps) == (512, 1640)
  assert config.optimizer.step_every == 546
  # Its losses: our additions off.
  assert (config.loss.depth_log_l1, config.loss.depth_aligned_log_l1,
          config.loss.dice_per_image) == (0.0, 0.0, False)


def test_derived_keys_follow_an_overridden_length():
  config = load_config("r64", "recipe=original,schedule=full")
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


def test_gpu_stages_compute_in_bfloat16_and_send_what_the_cpu_stages_render():
  for name in ("r64", "r112", "r192"):
    cpu, full = load_config(name), load_config(name, "schedule=full")
    assert cpu.model.dtype == "float32" and full.model.dtype == "bfloat16"
    # Sent at the CPU stage's rendered size, up to the 240 px the seed-sized sets are rendered at.
    assert full.data.transfer_resolution == min(cpu.data.synthetic.resolution, 240)
  # Predecoded where it fits 4 GB: 12,000 examples at 160 px do, at 280 and 480 px they do not.
  assert [load_config(name).data.predecoded for name in ("r64", "r112", "r192")] == [
      True, False, False]
  assert load_config("r64", "schedule=full").data.predecoded  # 16 GB; larger stages are not.
  assert not load_config("r192", "schedule=full").data.predecoded
  assert load_config("r64", "schedule=full,recipe=original").model.dtype == "float32"


def test_every_stage_and_variant_is_valid():
  for name in ("r64", "r112", "r192"):
    for arg in (None, "schedule=full", "recipe=original",
                "data=original,recipe=original,schedule=full"):
      config_lib.validate(load_config(name, arg), device_count=8)


def test_a_short_full_schedule_is_valid_and_its_zero_intervals_mean_never():
  from dmjax import train

  config = load_config("r64", "schedule=full,recipe=original")
  config.num_train_steps = 10  # Under 20 steps every derived interval but evaluation's is 0.
  assert (config.checkpoint_every_steps, config.optimizer.step_every) == (0, 3)
  config.num_train_steps = 2
  assert (config.eval_every_steps, config.optimizer.step_every) == (0, 0)
  config_lib.validate(config, device_count=1)
  assert not any(train.is_due(step, 0) for step in range(10))
  assert [step for step in range(1, 10) if train.is_due(step, 4)] == [4, 8]


@pytest.mark.parametrize(("key", "value", "message"), [
    ("checkpoint_every_steps", -1, "a whole number of steps, 0 for never"),
    ("eval_every_steps", -100, "a whole number of steps, 0 for never"),
    ("optimizer.step_every", -3, "a whole number of steps, 0 for never"),
    ("num_train_steps", 0, "a positive number of steps"),
    ("eval_batch_size", 6, "a positive multiple of the 4 devices"),
    ("batch_size", 2, "a positive multiple of the 4 devices"),
    ("data.resolution", 40, "a positive multiple of 16"),
    ("data.num_eval_examples", 0, "or -1 for all"),
    ("keep_checkpoints", 0, "at least 1"),
    ("loss.ssim_window", 4, "an odd window of at most data.resolution=64"),
    ("loss.ssim_form", "kornia", "expected one of"),
])
def test_bad_settings_are_one_line_errors_naming_the_key(key, value, message):
  from dmjax import errors

  config = config_lib.base_config()  # 64 px, batches of 32 and 64.
  *parents, last = key.split(".")
  section = config
  for part in parents:
    section = section[part]
  section[last] = value
  with pytest.raises(errors.UserError) as caught:
    config_lib.validate(config, device_count=4)
  assert str(caught.value).startswith(f"config.{key}={value!r}: ")
  assert message in str(caught.value) and "\n" not in str(caught.value)


def test_the_original_recipe_uses_the_originals_ssim():
  config = load_config("r64", "recipe=original")
  assert (config.loss.ssim_window, config.loss.ssim_form) == (3, "kornia2020")
  assert load_config("r64").loss.ssim_form == "reference"


def test_each_models_own_recipe():
  unet = load_config("r64", "model=unet_dual,recipe=original")  # MODELS.md §1.6–1.8.
  assert (unet.model.name, unet.model.input_norm, unet.model.decoder_activation) == (
      "unet_dual", "unit", "leaky_relu")
  assert (unet.optimizer.name, unet.optimizer.learning_rate, unet.optimizer.weight_decay,
          unet.optimizer.schedule, unet.optimizer.step_every) == ("adamw", 1e-3, 0.0, "step", 0)
  u2net = load_config("r64", "model=u2netp_dual,recipe=original")  # §2.5–2.6.
  assert (u2net.model.input_norm, u2net.optimizer.schedule, u2net.optimizer.learning_rate) == (
      "image_max", "one_cycle", 1e-2)
  two = load_config("r64", "model=two_stage,recipe=original")  # §3.3.
  assert two.model.teacher_forcing_steps == two.num_train_steps // 4
  assert two.data.augment.enabled and not unet.data.augment.enabled
  weights = lambda c: {k for k in ("mask_bce", "mask_dice", "mask_iou", "depth_l1", "depth_ssim",
                                   "depth_log_l1", "depth_aligned_log_l1", "depth_edge",
                                   "depth_sobel_edge", "depth_bce_dice", "depth_bce", "depth_hu",
                                   "side_bce") if c.loss[k] > 0}
  assert weights(unet) == {"mask_bce", "mask_iou", "depth_l1", "depth_ssim", "depth_sobel_edge"}
  assert weights(u2net) == {"mask_bce", "depth_bce", "side_bce"}
  assert weights(two) == {"mask_bce", "mask_dice", "depth_hu"}
  # Without model=, recipe=original is seed 002's, as before; with it, the default recipe applies.
  assert load_config("r64", "recipe=original").model.name == "depthmasknet"
  default = load_config("r64", "model=u2netp_dual")
  assert (default.model.name, default.optimizer.schedule, default.loss.side_bce) == (
      "u2netp_dual", "cosine", 0.0)


@pytest.mark.parametrize(("arg", "message"), [
    ("model=resnet", "model='resnet'"),
    ("model=depthmasknet_v2,recipe=original", "depthmasknet_v2 has no recipe of its own"),
])
def test_bad_models_are_refused(arg, message):
  with pytest.raises(ValueError, match=message):
    config_lib.stage_config(64, arg)


def test_one_cycle_schedule_is_seed_003s():
  from dmjax import train  # noqa: PLC0415

  optimizer = load_config("r64", "model=u2netp_dual,recipe=original").optimizer
  # The 64 px stage: 10 epochs of 4,375 steps. The notebook printed 0.0028000823 at the start
  # of epoch 2 (MODELS.md §2.6); the peak 0.01 falls at step 0.5·T - 1, 0.001 at both ends.
  schedule = train.create_learning_rate_schedule(optimizer, 43_750)
  assert float(schedule(4_375)) == pytest.approx(0.0028000823, rel=1e-6)
  assert [float(schedule(k)) for k in (0, 21_874, 43_749)] == pytest.approx([1e-3, 1e-2, 1e-3])


def test_main_refuses_a_bad_setting_in_one_line_before_writing_anything(tmp_path):
  import subprocess
  import sys

  workdir = tmp_path / "run"
  result = subprocess.run(
      [sys.executable, "-m", "dmjax.main", "--config=configs/r64.py",
       "--config.data.resolution=40", f"--workdir={workdir}"],
      cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode != 0
  assert result.stderr.strip().splitlines()[-1] == (
      "error: config.data.resolution=40: expected a positive multiple of 16")
  assert not workdir.exists()


@pytest.mark.parametrize("arg", ["data=seed", "recipe=seed", "model=unet_dual,recipe=seed"])
def test_the_old_spellings_of_the_original_system_are_refused_naming_the_new_one(arg):
  from dmjax import errors

  key = arg.split(",")[-1].split("=")[0]
  with pytest.raises(errors.UserError) as caught:
    load_config("r64", arg)
  assert str(caught.value) == (f"config argument {key}=seed: the original system is now called "
                               f"'original': use {key}=original")


@pytest.mark.parametrize(("key", "value", "message"), [
    ("data.source", "seed", "config.data.source='seed': the original system's data is now "
     "data.source='original'"),
    ("data.on_device", False, "config.data.on_device=False: the host augmentation path is gone"),
])
def test_old_settings_in_a_new_config_are_refused_in_one_line(key, value, message):
  from dmjax import errors

  config = config_lib.base_config()
  section, last = key.split(".")
  config[section][last] = value
  with pytest.raises(errors.UserError) as caught:
    config_lib.validate(config, device_count=1)
  assert str(caught.value).startswith(message) and "\n" not in str(caught.value)
  config = config_lib.base_config()
  config.data.seed_layout = config.data.original_layout.to_dict()
  with pytest.raises(errors.UserError, match=r"^config.data.seed_layout: renamed "
                     r"config.data.original_layout$"):
    config_lib.validate(config, device_count=1)


def test_the_data_source_refuses_the_old_name_naming_the_new_one():
  from dmjax import errors
  from dmjax.data import sources

  config = config_lib.base_config()
  config.data.source = "seed"
  with pytest.raises(errors.UserError, match="now config.data.source='original'"):
    sources.get_source(config)


def saved_before_issue_14(source="seed"):
  """A config as a checkpoint written before issue 14 holds it (JSON): data.seed_layout,
  data.on_device, and the original system's data called "seed"."""
  saved = json.loads(config_lib.base_config().to_json())
  saved["data"]["seed_layout"] = saved["data"].pop("original_layout")
  saved["data"]["seed_layout"]["split_seed"] = 7
  saved["data"].update(source=source, on_device=True, dir="/data/cats")
  return saved


def test_saved_configs_of_before_the_rename_read_in_todays_keys():
  saved = saved_before_issue_14()
  untouched = json.loads(json.dumps(saved))
  config = config_lib.upgrade_saved(saved)
  assert saved == untouched  # The checkpoint's own dict is left as it was.
  assert config.data.source == "original" and config.data.dir == "/data/cats"
  assert "seed_layout" not in config.data and "on_device" not in config.data
  assert config.data.original_layout.split_seed == 7
  assert config.data.original_layout.to_dict() == saved["data"]["seed_layout"]
  config_lib.validate(config, device_count=1)  # What a new run would accept.
  # Nothing else changes; the random seeds (config.seed, split_seed, ...) are not the system.
  expected = json.loads(json.dumps(saved))
  expected["data"]["original_layout"] = expected["data"].pop("seed_layout")
  expected["data"]["source"] = "original"
  del expected["data"]["on_device"]
  assert config.to_dict() == expected
  synthetic = config_lib.upgrade_saved(saved_before_issue_14(source="synthetic"))
  assert synthetic.data.source == "synthetic"
  # Today's configs pass through unchanged.
  today = json.loads(config_lib.base_config().to_json())
  assert config_lib.upgrade_saved(today).to_dict() == today


def test_loss_terms_missing_from_a_saved_config_were_off():
  saved = json.loads(config_lib.base_config().to_json())
  for term in ("depth_log_l1", "depth_aligned_log_l1"):
    assert saved["loss"].pop(term) > 0  # On by default today.
  config = config_lib.upgrade_saved(saved)
  assert (config.loss.depth_log_l1, config.loss.depth_aligned_log_l1) == (0.0, 0.0)


def test_a_renamed_saved_config_names_the_same_built_dataset(tmp_path):
  # The layout's contents, not its key, name the dataset: data built before the rename is found.
  from test_original_layout import layout_files, write_folders

  from dmjax.data import original_layout, sources

  root = write_folders(tmp_path / "cats", layout_files())
  saved = saved_before_issue_14()
  saved["data"].update(dir=root, tfds_dir=str(tmp_path / "tfds"))
  config = config_lib.upgrade_saved(saved)
  today = config_lib.base_config()
  today.data.update(source="original", dir=root, tfds_dir=str(tmp_path / "tfds"))
  today.data.original_layout.split_seed = 7
  original_layout.scan.cache_clear()
  source = sources.get_source(config)
  assert source.name == sources.get_source(today).name
  assert source.name.startswith("dmjax_seed/image_t30_s7_")  # Its directory before the rename.
