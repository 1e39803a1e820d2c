"""The other seed models (MODELS.md): unet_dual, u2netp_dual, two_stage.

Sizes and shapes come from jax.eval_shape (tracing, no compilation); one training step per
model with its own recipe compiles the real step at 32 px, batch 2.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dmjax import config as config_lib
from dmjax import models, parallel, train
from dmjax.data import schema
from dmjax.models import layers, two_stage, u2netp_dual, unet_dual

# MODELS.md's verified totals: (parameters, BatchNorm running-statistic numbers).
PINNED = {"unet_dual": (3_165_170, 4_480), "u2netp_dual": (1_769_306, 8_320),
          "two_stage": (5_767_154, 10_192)}
SIZES = (64, 96, 112, 192, 224)


def _count(tree) -> int:
  return sum(leaf.size for leaf in jax.tree.leaves(tree))


def _abstract_variables(model, height: int = 32, width: int | None = None):
  images = jnp.zeros((1, height, width or height, 3), jnp.float32)
  return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), images, images))


def _abstract_outputs(model, height: int, width: int | None = None, batch: int = 2,
                      with_variables: bool = False):
  images = jax.ShapeDtypeStruct((batch, height, width or height, 3), jnp.float32)

  def forward(bg, fg_bg):
    return model.init_with_output(jax.random.PRNGKey(0), bg, fg_bg)

  outputs, variables = jax.eval_shape(forward, images, images)
  return (outputs, variables) if with_variables else outputs


@pytest.mark.parametrize("name", sorted(PINNED))
def test_parameter_and_statistic_counts(name):
  variables = _abstract_variables(models.MODELS[name]())
  assert (_count(variables["params"]), _count(variables["batch_stats"])) == PINNED[name]
  assert {leaf.dtype for leaf in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}


def test_part_counts_match_the_tables():
  params = _abstract_variables(unet_dual.UNetDual())["params"]  # MODELS.md §1.3.
  assert [_count(params[k]) for k in ("encoder", "decoder_m", "decoder_d")] == [
      2_701_376, 117_905, 345_889]
  params = _abstract_variables(u2netp_dual.U2NetPDual())["params"]  # §2.3.
  assert [_count(params[f"stage{k}"]) for k in range(1, 7)] == [
      68_928, 95_328, 88_320, 81_312, 81_312, 81_312]
  for task in ("depth", "seg"):
    assert _count({k: v for k, v in params.items() if k.startswith(task)}) == 636_397
    assert [_count(params[f"{task}_stage{k}d"]) for k in range(5, 0, -1)] == [
        118_176, 118_176, 125_184, 132_192, 139_200]
  params = _abstract_variables(two_stage.TwoStage())["params"]  # §3.3.
  assert (_count(params["stage1"]), _count(params["stage2"])) == (1_582_585, 4_184_569)


def test_two_stage_variants():
  full = _abstract_variables(two_stage.TwoStage(variant="full"))
  assert (_count(full["params"]), _count(full["batch_stats"])) == (40_149_074, 26_848)
  # Only stage 2's first conv changes: 32 · 7 · 7 weights per input channel beyond 4.
  for stage2_input, channels in (("multiply", 3), ("both", 7)):
    params = _abstract_variables(two_stage.TwoStage(stage2_input=stage2_input))["params"]
    assert _count(params) == PINNED["two_stage"][0] + 32 * 49 * (channels - 4)


@pytest.mark.parametrize(("name", "size"), itertools.product(sorted(PINNED), SIZES))
def test_output_shapes(name, size):
  outputs = _abstract_outputs(models.MODELS[name](), size)
  expected = {"mask": (2, size, size, 1), "depth": (2, size, size, 1)}
  if name == "u2netp_dual":
    expected |= {"mask_sides": (2, size, size, 6), "depth_sides": (2, size, size, 6)}
  assert {k: v.shape for k, v in outputs.items()} == expected
  assert {v.dtype for v in outputs.values()} == {jnp.dtype(jnp.float32)}


def test_sizes_each_model_accepts():
  assert _abstract_outputs(unet_dual.UNetDual(), 36, 44)["mask"].shape == (2, 36, 44, 1)
  assert _abstract_outputs(u2netp_dual.U2NetPDual(), 37, 30)["depth"].shape == (2, 37, 30, 1)
  assert _abstract_outputs(two_stage.TwoStage(), 50, 38)["depth"].shape == (2, 50, 38, 1)
  with pytest.raises(ValueError, match=r"divisible by 4; got 66x64"):
    _abstract_outputs(unet_dual.UNetDual(), 66, 64)


@pytest.mark.parametrize(("model", "message"), [
    (unet_dual.UNetDual(decoder_activation="gelu"), "decoder_activation='gelu'"),
    (unet_dual.UNetDual(input_norm="imagenet"), "input_norm='imagenet'"),
    (two_stage.TwoStage(variant="M"), "variant='M'"),
    (two_stage.TwoStage(stage2_input="add"), "stage2_input='add'"),
])
def test_bad_options_are_named(model, message):
  with pytest.raises(ValueError, match=message):
    _abstract_outputs(model, 32)


def test_bfloat16_compute_keeps_float32_parameters_and_outputs():
  for model in (unet_dual.UNetDual(dtype=jnp.bfloat16), u2netp_dual.U2NetPDual(dtype=jnp.bfloat16),
                two_stage.TwoStage(dtype=jnp.bfloat16)):
    outputs, variables = _abstract_outputs(model, 32, with_variables=True)
    assert {leaf.dtype for leaf in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}
    assert {v.dtype for v in outputs.values()} == {jnp.dtype(jnp.float32)}


def test_input_renormalisation_matches_numpy():
  rng = np.random.default_rng(0)
  rgb = {key: rng.uniform(0, 0.8, (2, 5, 4, 3)).astype(np.float32) for key in ("bg", "fg_bg")}
  standardised = {key: (rgb[key] - np.array(schema.PHOTO_MEAN[key])) / np.array(
      schema.PHOTO_STD[key]) for key in rgb}
  unit = layers.renormalize_inputs(standardised["bg"], standardised["fg_bg"], "unit")
  by_max = layers.renormalize_inputs(standardised["bg"], standardised["fg_bg"], "image_max")
  for k, key in enumerate(("bg", "fg_bg")):
    np.testing.assert_allclose(unit[k], rgb[key], atol=1e-6)
    per_image_max = rgb[key].reshape(2, -1).max(axis=1)[:, None, None, None]
    np.testing.assert_allclose(by_max[k], rgb[key] / per_image_max, atol=1e-6)


def test_ceil_mode_pool_matches_loops():
  x = np.random.default_rng(0).normal(size=(1, 5, 3, 2)).astype(np.float32)
  expected = np.zeros((1, 3, 2, 2), np.float32)
  for i, j in itertools.product(range(3), range(2)):
    expected[0, i, j] = x[0, 2 * i:2 * i + 2, 2 * j:2 * j + 2].max(axis=(0, 1))
  np.testing.assert_array_equal(layers.max_pool_2x2_ceil(jnp.asarray(x)), expected)


def test_teacher_forcing_anneals_to_zero():
  mask = jnp.zeros((4000, 2, 2, 1))
  label = jnp.ones((4000, 2, 2, 1))
  key = jax.random.PRNGKey(0)
  forced = [float(two_stage.teacher_forced(mask, label, step, 100, key).mean())
            for step in (0, 50, 100, 1000)]
  # Probabilities 0.5, 0.25, 0, 0; 4000 draws: standard error below 0.008.
  np.testing.assert_allclose(forced, [0.5, 0.25, 0.0, 0.0], atol=0.03)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(PINNED))
def test_one_training_step_with_the_models_own_recipe(name):
  config = config_lib.stage_config(64, f"model={name},recipe=original")
  config.data.resolution, config.batch_size = 32, 2
  config.optimizer.warmup_steps = 0  # two_stage's (the project's) would start at rate 0.
  model = models.create_model(config.model)
  tx = train.create_optimizer(config)
  state = train.create_train_state(config, model, tx, jax.random.PRNGKey(0))
  rng = np.random.default_rng(0)
  batch = {"bg": rng.normal(size=(2, 32, 32, 3)), "fg_bg": rng.normal(size=(2, 32, 32, 3)),
           "mask": rng.random((2, 32, 32, 1)) > 0.7, "depth": rng.random((2, 32, 32, 1))}
  batch = {k: v.astype(np.float32) for k, v in batch.items()}
  before = jax.tree.map(np.array, state.params)  # The step donates the state it is given.
  step = train.make_train_step(model, tx, config.loss, parallel.create_mesh())
  new_state, terms = step(state, batch)
  expected_terms = {"unet_dual": {"mask_bce", "mask_iou", "depth_l1", "depth_ssim",
                                  "depth_sobel_edge"},
                    "u2netp_dual": {"mask_bce", "depth_bce", "side_bce"},
                    "two_stage": {"mask_bce", "mask_dice", "depth_hu"}}[name]
  assert set(terms) == expected_terms | {"total", "grad_norm", "param_norm"}
  assert all(np.isfinite(float(v)) for v in terms.values())
  assert int(new_state.step) == 1
  changed = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))),
                         before, new_state.params)
  assert all(jax.tree.leaves(changed))  # Every parameter learnt from the losses.
