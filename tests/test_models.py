"""Models: sizes, shapes, pixel shuffle order, ICNR, blur, bfloat16 and input checks."""

import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from dmjax import config as config_lib
from dmjax.models import MODELS, create_model, depthmasknet, depthmasknet_v2, layers

SEED_PARAMS = 5_230_720
SEED_BATCH_STATS = 3_968
V2_MAX_PARAMS = 8_000_000
V2_PARAMS = 524_168  # width 8, as its docstring says.
V2_BATCH_STATS = 2_000
NARROW_WIDTH = 4  # depthmasknet_v2 width for tests that run the model.


def _count(tree) -> int:
  return sum(leaf.size for leaf in jax.tree.leaves(tree))


def _abstract_variables(model: nn.Module, size: int = 16):
  images = jnp.zeros((1, size, size, 3), jnp.float32)
  return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), images, images))


def _abstract_outputs(model: nn.Module, size: int, *, train: bool):
  images = jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32)

  def forward(bg, fg_bg):
    variables = model.init(jax.random.PRNGKey(0), bg, fg_bg)
    if train:
      return model.apply(variables, bg, fg_bg, train=True, mutable=["batch_stats"])[0]
    return model.apply(variables, bg, fg_bg, train=False)

  return jax.eval_shape(forward, images, images)


def _random_images(size: int, batch: int = 2, seed: int = 0):
  bg_key, fg_bg_key = jax.random.split(jax.random.PRNGKey(seed))
  shape = (batch, size, size, 3)
  return jax.random.normal(bg_key, shape), jax.random.normal(fg_bg_key, shape)


def _is_constant_in_2x2_blocks(x: np.ndarray) -> bool:
  batch, height, width, channels = x.shape
  blocks = x.reshape(batch, height // 2, 2, width // 2, 2, channels)
  return np.allclose(blocks, blocks[:, :, :1, :, :1, :], rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def narrow_v2_variables():
  model = depthmasknet_v2.DepthMaskNetV2(width=NARROW_WIDTH)
  bg, fg_bg = _random_images(32)
  return model.init(jax.random.PRNGKey(1), bg, fg_bg)


def test_seed_model_has_the_original_size():
  variables = _abstract_variables(depthmasknet.DepthMaskNet())
  assert _count(variables["params"]) == SEED_PARAMS
  assert _count(variables["batch_stats"]) == SEED_BATCH_STATS


def test_seed_model_parts_have_the_original_sizes():
  params = _abstract_variables(depthmasknet.DepthMaskNet())["params"]
  assert _count(params["bg_stem"]) == _count(params["fg_bg_stem"]) == 928
  assert _count(params["merge"]) == 2_048
  assert [_count(params[f"encode{k}"]) for k in range(1, 5)] == [45_312, 180_736, 721_920,
                                                                  2_885_632]
  for task in ("mask", "depth"):
    assert [_count(params[f"{task}_decode{k}"]) for k in range(1, 5)] == [524_288, 131_072,
                                                                           32_768, 8_192]
    assert _count(params[f"{task}_output"]) == 288


def test_v2_has_its_documented_size_within_the_budget():
  variables = _abstract_variables(depthmasknet_v2.DepthMaskNetV2())
  assert _count(variables["params"]) == V2_PARAMS <= V2_MAX_PARAMS
  assert _count(variables["batch_stats"]) == V2_BATCH_STATS


def test_parameters_are_float32_even_for_bfloat16_compute():
  variables = _abstract_variables(depthmasknet_v2.DepthMaskNetV2(dtype=jnp.bfloat16))
  assert {leaf.dtype for leaf in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}


@pytest.mark.parametrize(("name", "size", "train"),
                         itertools.product(["depthmasknet", "depthmasknet_v2"], [64, 112, 192],
                                           [False, True]))
def test_output_shapes(name, size, train):
  outputs = _abstract_outputs(MODELS[name](), size, train=train)
  assert set(outputs) == {"mask", "depth"}
  for logits in outputs.values():
    assert logits.shape == (2, size, size, 1)
    assert logits.dtype == jnp.float32


@pytest.mark.parametrize("model", [depthmasknet_v2.DepthMaskNetV2(width=NARROW_WIDTH),
                                   depthmasknet.DepthMaskNet()], ids=["v2", "seed"])
def test_non_square_input_is_fine(model):
  bg = jnp.zeros((1, 32, 48, 3))
  outputs = jax.eval_shape(lambda: model.init_with_output(jax.random.PRNGKey(0), bg, bg)[0])
  assert outputs["mask"].shape == outputs["depth"].shape == (1, 32, 48, 1)


@pytest.mark.parametrize("name", ["depthmasknet", "depthmasknet_v2"])
@pytest.mark.parametrize("shape", [(1, 40, 40, 3), (1, 64, 72, 3)])
def test_size_not_divisible_by_16_is_refused(name, shape):
  images = jnp.zeros(shape)
  with pytest.raises(ValueError, match="divisible by 16"):
    jax.eval_shape(lambda: MODELS[name]().init(jax.random.PRNGKey(0), images, images))


def test_mismatched_inputs_are_refused():
  with pytest.raises(ValueError, match="same shape"):
    layers.check_inputs(jnp.zeros((1, 32, 32, 3)), jnp.zeros((1, 64, 64, 3)))


def test_registry_builds_models_from_config():
  config = config_lib.base_config()
  model = create_model(config.model)
  assert isinstance(model, depthmasknet_v2.DepthMaskNetV2)
  assert model.blur is config.model.blur
  config.model.name = "depthmasknet"
  config.model.dtype = "bfloat16"
  model = create_model(config.model)  # `blur` does not apply to the seed model and is left out.
  assert isinstance(model, depthmasknet.DepthMaskNet)
  assert model.dtype == jnp.bfloat16


def test_registry_refuses_unknown_name():
  with pytest.raises(ValueError, match="unknown model"):
    create_model(ml_collections.ConfigDict({"name": "no_such_model", "dtype": "float32"}))


@pytest.mark.parametrize(("r", "channels"), [(2, 3), (3, 2)])
def test_pixel_shuffle_follows_pytorch_order(r, channels):
  batch, height, width = 2, 3, 4
  x = np.random.default_rng(0).normal(size=(batch, height, width, channels * r * r))
  x = x.astype(np.float32)  # What JAX computes in: the values must move, not round.
  expected = np.zeros((batch, height * r, width * r, channels), np.float32)
  # PyTorch: out[n, c, h·r + i, w·r + j] = in[n, c·r² + i·r + j, h, w], here in NHWC.
  for n, c, h, w, i, j in itertools.product(range(batch), range(channels), range(height),
                                            range(width), range(r), range(r)):
    expected[n, h * r + i, w * r + j, c] = x[n, h, w, c * r * r + i * r + j]
  np.testing.assert_array_equal(np.asarray(layers.pixel_shuffle(jnp.asarray(x), r)), expected)


def test_pixel_unshuffle_inverts_pixel_shuffle():
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 3, 5, 8))
  np.testing.assert_array_equal(layers.pixel_unshuffle(layers.pixel_shuffle(x, 2), 2), x)


@pytest.mark.parametrize("kernel", [1, 3])
def test_icnr_shuffle_starts_free_of_checkerboard(kernel):
  conv = nn.Conv(4 * 5, (kernel, kernel), padding="SAME", kernel_init=layers.icnr_init(2))
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 6, 7, 8))
  upsampled = layers.pixel_shuffle(conv.init_with_output(jax.random.PRNGKey(1), x)[0], 2)
  assert upsampled.shape == (2, 12, 14, 5)
  assert _is_constant_in_2x2_blocks(np.asarray(upsampled))
  assert np.std(np.asarray(upsampled)) > 0.1  # Not trivially constant.


def test_icnr_keeps_the_base_initialisers_scale():
  kernel = layers.icnr_init(2)(jax.random.PRNGKey(0), (3, 3, 64, 4 * 32))
  bound = 1 / np.sqrt(3 * 3 * 64)  # PyTorch's U(±1/√fan_in).
  assert np.abs(kernel).max() <= bound
  assert np.abs(kernel).max() > 0.9 * bound


def test_v2_outputs_start_free_of_checkerboard_without_blur(narrow_v2_variables):
  # With blur off, the last stage is an ICNR conv + shuffle: constant in 2x2 blocks at init.
  model = depthmasknet_v2.DepthMaskNetV2(width=NARROW_WIDTH, blur=False)
  outputs = model.apply(narrow_v2_variables, *_random_images(32, seed=2), train=False)
  for logits in outputs.values():
    assert _is_constant_in_2x2_blocks(np.asarray(logits))
    assert np.std(np.asarray(logits)) > 0


def test_blur_removes_checkerboard_and_keeps_constants():
  rows, cols = np.indices((8, 8))
  checkerboard = jnp.asarray(((rows + cols) % 2).astype(np.float32))[None, :, :, None]
  np.testing.assert_allclose(layers.binomial_blur(checkerboard), 0.5)
  constant = jnp.full((1, 6, 6, 2), 3.0)
  np.testing.assert_allclose(layers.binomial_blur(constant), constant)


def test_max_pool_matches_flax():
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 6, 3))
  np.testing.assert_array_equal(layers.max_pool_2x2(x), nn.max_pool(x, (2, 2), strides=(2, 2)))


def test_bfloat16_forward_stays_close_to_float32(narrow_v2_variables):
  images = _random_images(32, seed=3)
  reference = depthmasknet_v2.DepthMaskNetV2(width=NARROW_WIDTH).apply(
      narrow_v2_variables, *images, train=False)
  outputs = depthmasknet_v2.DepthMaskNetV2(width=NARROW_WIDTH, dtype=jnp.bfloat16).apply(
      narrow_v2_variables, *images, train=False)
  for task in ("mask", "depth"):
    assert outputs[task].dtype == jnp.float32
    # bfloat16 keeps 8 significant bits (relative step 2^-8 ≈ 0.4%); over a dozen layers the
    # error grows to a few percent of the outputs' spread, not more.
    error = np.abs(np.asarray(outputs[task]) - np.asarray(reference[task]))
    spread = np.std(np.asarray(reference[task]))
    assert error.mean() < 0.03 * spread
    assert error.max() < 0.2 * spread
