"""Every loss term against an independent float64 numpy computation written here."""

import dm_pix
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from skimage.metrics import structural_similarity

from dmjax import config as config_lib
from dmjax import losses

ALL_TERMS = ("mask_bce", "mask_dice", "depth_l1", "depth_ssim", "depth_edge", "depth_bce_dice",
             "depth_log_l1", "depth_aligned_log_l1")


def loss_config(**overrides) -> ml_collections.ConfigDict:
  cfg = config_lib.base_config().loss
  for term in ALL_TERMS:
    cfg[term] = 1.0
  cfg.dice_per_image = False  # The numpy reference's default; tests that vary it say so.
  cfg.update(overrides)
  return cfg


def random_inputs(seed=0, batch_size=3, size=24):
  rng = np.random.default_rng(seed)
  shape = (batch_size, size, size, 1)
  outputs = {"mask": rng.normal(0, 2, shape).astype(np.float32),
             "depth": rng.normal(0, 1.5, shape).astype(np.float32)}
  # Smooth-ish depth with noise, soft-edged masks: like real labels, not pure noise.
  rows = np.linspace(0, 1, size)[None, :, None, None]
  cols = np.linspace(0.2, 1, size)[None, None, :, None]
  ramp = rows * cols
  depth = np.clip(ramp + 0.1 * rng.normal(size=shape), 0, 1).astype(np.float32)
  mask = np.clip(rng.normal(0, 1, shape) + 0.3, 0, 1).astype(np.float32)
  return outputs, {"mask": mask, "depth": depth}


# Independent numpy references (float64, plain formulas and loops).


def np_sigmoid(x):
  return 1.0 / (1.0 + np.exp(-np.float64(x)))


def np_bce(logits, labels):
  p = np_sigmoid(logits)
  return np.mean(-(labels * np.log(p) + (1 - labels) * np.log(1 - p)))


def np_dice_loss(probs, labels, per_image):
  if per_image:
    pairs = zip(probs, labels, strict=True)
    return np.mean([np_dice_loss(p[None], t[None], per_image=False) for p, t in pairs])
  return 1 - (2 * np.sum(probs * labels) + 1) / (np.sum(probs) + np.sum(labels) + 1)


def np_ssim_map(a, b, window, sigma=1.5):
  """SSIM at every position where the whole Gaussian window fits, by explicit loops."""
  offsets = np.arange(window) - (window - 1) / 2
  g = np.exp(-0.5 * (offsets / sigma) ** 2)
  g /= g.sum()
  w = np.outer(g, g)
  c1, c2 = 0.01**2, 0.03**2
  out = np.empty((a.shape[0] - window + 1, a.shape[1] - window + 1))
  for i in range(out.shape[0]):
    for j in range(out.shape[1]):
      pa, pb = a[i:i + window, j:j + window], b[i:i + window, j:j + window]
      mu_a, mu_b = np.sum(w * pa), np.sum(w * pb)
      var_a = np.sum(w * (pa - mu_a) ** 2)
      var_b = np.sum(w * (pb - mu_b) ** 2)
      cov = np.sum(w * (pa - mu_a) * (pb - mu_b))
      out[i, j] = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)
                   / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)))
  return out


def ssim_loss_from_maps(maps):
  return np.mean([np.mean(np.clip((1 - m) / 2, 0, 1)) for m in maps])


def np_edge_loss(pred, target):
  per_image = []
  for p, t in zip(pred[..., 0], target[..., 0], strict=True):
    h, w = p.shape
    total = 0.0
    for i in range(h):
      for j in range(w):
        dy = (p[i + 1, j] - p[i, j]) - (t[i + 1, j] - t[i, j]) if i < h - 1 else 0.0
        dx = (p[i, j + 1] - p[i, j]) - (t[i, j + 1] - t[i, j]) if j < w - 1 else 0.0
        total += abs(dy) + abs(dx)
    per_image.append(total / (h * w))
  return np.mean(per_image)


def np_aligned_log_l1(pred, truth):
  per_image = []
  for p, t in zip(pred[..., 0], truth[..., 0], strict=True):
    valid = t >= 0.01
    scale, shift = np.polyfit(p[valid], t[valid], 1)
    aligned = np.maximum(scale * p[valid] + shift, 0.01)
    per_image.append(np.mean(np.abs(np.log(aligned) - np.log(t[valid]))))
  return np.mean(per_image)


def np_terms(outputs, batch, per_image_dice=False, window=11):
  mask_p = np_sigmoid(outputs["mask"])
  depth_p = np_sigmoid(outputs["depth"])
  mask, depth = np.float64(batch["mask"]), np.float64(batch["depth"])
  if window == 11:
    maps = []
    for p, t in zip(depth_p[..., 0], depth[..., 0], strict=True):
      _, full = structural_similarity(p, t, gaussian_weights=True, sigma=1.5,
                                      use_sample_covariance=False, data_range=1, full=True)
      maps.append(full[5:-5, 5:-5])  # skimage pads; the valid region is what dm_pix computes.
  else:
    maps = [np_ssim_map(p, t, window) for p, t in zip(depth_p[..., 0], depth[..., 0], strict=True)]
  return {
      "mask_bce": np_bce(outputs["mask"], mask),
      "mask_dice": np_dice_loss(mask_p, mask, per_image_dice),
      "depth_l1": np.mean(np.abs(depth_p - depth)),
      "depth_log_l1": np.mean(np.abs(np.log(np.maximum(depth_p, 0.01))
                                     - np.log(np.maximum(depth, 0.01)))),
      "depth_aligned_log_l1": np_aligned_log_l1(depth_p, depth),
      "depth_ssim": ssim_loss_from_maps(maps),
      "depth_edge": np_edge_loss(depth_p, depth),
      "depth_bce_dice": (np_bce(outputs["depth"], depth)
                         + np_dice_loss(depth_p, depth, per_image_dice)),
  }


def jitted_losses(cfg):
  return jax.jit(lambda outputs, batch: losses.compute_losses(outputs, batch, cfg))


@pytest.mark.parametrize("per_image_dice,window", [(False, 11), (True, 3)])
def test_terms_match_numpy(per_image_dice, window):
  outputs, batch = random_inputs()
  weights = dict(zip(ALL_TERMS, (0.5, 2.0, 0.1, 1.0, 3.0, 0.25, 0.7, 1.5), strict=True))
  cfg = loss_config(dice_per_image=per_image_dice, ssim_window=window, **weights)
  total, terms = jitted_losses(cfg)(outputs, batch)
  expected = np_terms(outputs, batch, per_image_dice, window)
  assert set(terms) == set(ALL_TERMS)
  for name in ALL_TERMS:
    assert terms[name].dtype == jnp.float32
    np.testing.assert_allclose(terms[name], expected[name], rtol=1e-5, atol=1e-6, err_msg=name)
  np.testing.assert_allclose(total, sum(weights[k] * expected[k] for k in ALL_TERMS), rtol=1e-5)


def test_dm_pix_ssim_matches_skimage_window_11():
  _, batch = random_inputs(seed=1, batch_size=2)
  pred = np.clip(batch["depth"] + 0.15 * np.random.default_rng(2).normal(size=batch["depth"].shape),
                 0, 1).astype(np.float32)
  term = jax.jit(losses.ssim_loss, static_argnames="window")(
      pred, batch["depth"], jnp.ones(2), window=11)
  ours = jax.jit(dm_pix.ssim)(pred, batch["depth"])
  for k in range(2):
    mean_ssim = structural_similarity(
        np.float64(pred[k, ..., 0]), np.float64(batch["depth"][k, ..., 0]), gaussian_weights=True,
        sigma=1.5, use_sample_covariance=False, data_range=1)
    np.testing.assert_allclose(ours[k], mean_ssim, atol=1e-5)
  expected_maps = [
      structural_similarity(np.float64(p), np.float64(t), gaussian_weights=True, sigma=1.5,
                            use_sample_covariance=False, data_range=1, full=True)[1][5:-5, 5:-5]
      for p, t in zip(pred[..., 0], batch["depth"][..., 0], strict=True)]
  np.testing.assert_allclose(term, ssim_loss_from_maps(expected_maps), atol=1e-5)


def test_window_3_ssim_matches_numpy_loops():
  _, batch = random_inputs(seed=3, batch_size=2, size=16)
  pred = np.random.default_rng(4).random(batch["depth"].shape).astype(np.float32)
  ours = jax.jit(lambda a, b: dm_pix.ssim(a, b, filter_size=3, return_map=True))(
      pred, batch["depth"])
  for k in range(2):
    np.testing.assert_allclose(ours[k, ..., 0], np_ssim_map(np.float64(pred[k, ..., 0]),
                                                            np.float64(batch["depth"][k, ..., 0]),
                                                            3), atol=1e-5)


def np_kornia2020_ssim_loss(pred, target, window=3):
  """kornia.losses.SSIM(window) as installed in 2020 (SPEC §3): each image reflect-padded by
  window // 2 (numpy's "reflect"), SSIM at every pixel, mean(clip(1 - SSIM, 0, 1) / 2)."""
  per_image = []
  for a, b in zip(np.float64(pred[..., 0]), np.float64(target[..., 0]), strict=True):
    ssim = np_ssim_map(np.pad(a, window // 2, mode="reflect"),
                       np.pad(b, window // 2, mode="reflect"), window)
    assert ssim.shape == a.shape
    per_image.append(np.mean(np.clip(1 - ssim, 0, 1) / 2))
  return np.mean(per_image)


@pytest.mark.parametrize("anti_correlated", [False, True])
def test_kornia2020_ssim_matches_numpy_and_differs_from_the_reference(anti_correlated):
  _, batch = random_inputs(seed=6, batch_size=2, size=12)
  target = batch["depth"]
  noise = 0.2 * np.random.default_rng(7).normal(size=target.shape)
  # Anti-correlated: SSIM < 0 in places, where the two forms' clips differ most.
  pred = np.clip((1 - target if anti_correlated else target) + noise, 0, 1).astype(np.float32)
  loss = jax.jit(losses.ssim_loss, static_argnames=("window", "form"))
  kornia = loss(pred, target, jnp.ones(2), window=3, form="kornia2020")
  np.testing.assert_allclose(kornia, np_kornia2020_ssim_loss(pred, target), rtol=1e-5, atol=1e-6)
  reference = loss(pred, target, jnp.ones(2), window=3, form="reference")
  expected_reference = ssim_loss_from_maps(
      [np_ssim_map(p, t, 3) for p, t in zip(np.float64(pred[..., 0]), target[..., 0],
                                            strict=True)])
  np.testing.assert_allclose(reference, expected_reference, rtol=1e-5, atol=1e-6)
  assert abs(float(kornia) - float(reference)) > 1e-3  # Border pixels and clipping differ.


def test_kornia2020_ssim_through_compute_losses_has_finite_gradients():
  outputs, batch = random_inputs(batch_size=2, size=16)
  cfg = loss_config(ssim_window=3, ssim_form="kornia2020")
  (total, terms), grads = jax.jit(jax.value_and_grad(
      lambda o: losses.compute_losses(o, batch, cfg), has_aux=True))(outputs)
  np.testing.assert_allclose(
      terms["depth_ssim"],
      np_kornia2020_ssim_loss(np_sigmoid(outputs["depth"]), batch["depth"]), rtol=1e-5)
  assert np.isfinite(total) and all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
  with pytest.raises(ValueError, match="config.loss.ssim_form='kornia'"):
    losses.compute_losses(outputs, batch, loss_config(ssim_form="kornia"))


def test_zero_weight_terms_are_skipped():
  outputs, batch = random_inputs(batch_size=2, size=16)
  cfg = loss_config(depth_ssim=0.0, depth_bce_dice=0.0, mask_dice=0.0, depth_log_l1=0.0,
                    depth_aligned_log_l1=0.0)
  total, terms = jitted_losses(cfg)(outputs, batch)
  assert set(terms) == {"mask_bce", "depth_l1", "depth_edge"}
  np.testing.assert_allclose(total, terms["mask_bce"] + terms["depth_l1"] + terms["depth_edge"],
                             rtol=1e-6)


def test_accepts_plain_dict_config_and_bfloat16_outputs():
  outputs, batch = random_inputs(batch_size=2, size=16)
  cfg = loss_config(ssim_window=3).to_dict()
  total, terms = jitted_losses(cfg)(
      {k: jnp.asarray(v, jnp.bfloat16) for k, v in outputs.items()}, batch)
  assert total.dtype == jnp.float32
  expected = np_terms({k: np.float32(jnp.asarray(v, jnp.bfloat16)) for k, v in outputs.items()},
                      batch, window=3)
  for name in ALL_TERMS:
    np.testing.assert_allclose(terms[name], expected[name], rtol=1e-5, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("per_image_dice", [False, True])
def test_example_weight(per_image_dice):
  outputs, batch = random_inputs(batch_size=3, size=16)
  fn = jitted_losses(loss_config(dice_per_image=per_image_dice, ssim_window=3))

  def expected_on(examples):
    return np_terms({k: v[examples] for k, v in outputs.items()},
                    {k: v[examples] for k, v in batch.items()}, per_image_dice, window=3)

  # The third example is padding: weight 0, whatever it contains.
  padded_batch = dict(batch, example_weight=np.array([1, 1, 0], np.float32))
  padded_batch["depth"] = padded_batch["depth"].copy()
  padded_batch["depth"][2] = 7.0
  _, padded = fn(outputs, padded_batch)
  # Weight 2 counts an example twice.
  _, weighted = fn(outputs, dict(batch, example_weight=np.array([0, 2, 1], np.float32)))
  expected_padded, expected_weighted = expected_on([0, 1]), expected_on([1, 1, 2])
  for name in ALL_TERMS:
    np.testing.assert_allclose(padded[name], expected_padded[name], rtol=1e-5, err_msg=name)
    np.testing.assert_allclose(weighted[name], expected_weighted[name], rtol=1e-5, err_msg=name)

  _, all_padding = fn(outputs, dict(batch, example_weight=np.zeros(3, np.float32)))
  for name in ("mask_bce", "depth_l1", "depth_ssim", "depth_edge"):
    assert float(all_padding[name]) == 0.0


def test_aligned_log_l1_ignores_scale_and_shift_and_fits_without_gradient():
  _, batch = random_inputs(batch_size=2, size=16)
  truth = jnp.asarray(batch["depth"])
  term = jax.jit(losses.aligned_log_l1_loss)
  assert float(term(0.3 + 0.5 * truth, truth, jnp.ones(2))) < 1e-5
  assert float(term(0.3 + 0.5 * truth ** 2, truth, jnp.ones(2))) > 0.05
  # The fit is held fixed: the gradient is that of |log(s·ŷ + t) - log y| for the fitted (s, t).
  pred = jnp.asarray(np_sigmoid(random_inputs(seed=3, batch_size=2, size=16)[0]["depth"]),
                     jnp.float32)
  grad = np.asarray(jax.grad(term)(pred, truth, jnp.ones(2)), np.float64)
  for k in range(2):
    p, t = np.float64(pred[k, ..., 0]), np.float64(truth[k, ..., 0])
    valid = t >= 0.01
    scale, shift = np.polyfit(p[valid], t[valid], 1)
    aligned = scale * p + shift
    expected = np.where(valid & (aligned > 0.01),
                        np.sign(np.log(np.maximum(aligned, 0.01)) - np.log(np.where(valid, t, 1)))
                        * scale / aligned / valid.sum() / 2, 0.0)
    np.testing.assert_allclose(grad[k, ..., 0], expected, rtol=1e-4, atol=1e-7)


def test_gradients_finite_on_degenerate_inputs():
  size = 16
  shape = (4, size, size, 1)
  rng = np.random.default_rng(5)
  # Image 0: empty mask, zero depth; 1: all foreground, constant depth; 2: extreme logits;
  # 3: prediction constant and equal to the truth's sigmoid preimage.
  mask = np.zeros(shape, np.float32)
  mask[1] = 1.0
  mask[2] = rng.random(shape[1:]) > 0.5
  depth = np.zeros(shape, np.float32)
  depth[1] = 0.5
  depth[2] = rng.random(shape[1:])
  depth[3] = 0.5
  mask_logits = np.zeros(shape, np.float32)
  mask_logits[2] = rng.choice([-40.0, 40.0], shape[1:])
  depth_logits = np.zeros(shape, np.float32)
  depth_logits[2] = rng.choice([-40.0, 40.0], shape[1:])
  batch = {"mask": mask, "depth": depth}
  for per_image_dice, window in ((False, 11), (True, 3)):
    cfg = loss_config(dice_per_image=per_image_dice, ssim_window=window)

    def total_loss(outputs, cfg=cfg):
      return losses.compute_losses(outputs, batch, cfg)[0]

    value, grads = jax.jit(jax.value_and_grad(total_loss))(
        {"mask": mask_logits, "depth": depth_logits})
    assert np.isfinite(value)
    for g in jax.tree.leaves(grads):
      assert np.all(np.isfinite(g))
      assert np.any(g != 0)

  # All-zero masks and labels everywhere: Dice loss is 1 - 1/(Σp + 1), gradients finite.
  zeros = {"mask": np.zeros(shape, np.float32), "depth": np.zeros(shape, np.float32)}
  cfg = loss_config(ssim_window=3)
  grads = jax.jit(jax.grad(lambda o: losses.compute_losses(o, zeros, cfg)[0]))(
      {"mask": np.full(shape, -5.0, np.float32), "depth": np.zeros(shape, np.float32)})
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))


# The other seeds' terms (MODELS.md §1.6, §2.5, §3.3).
SOBEL_X = np.array([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]], np.float64)


def np_sobel(image, mode, normalized):
  """Cross-correlation of a 2-D image with Sobel x and y after 1-pixel `mode` padding."""
  padded = np.pad(np.float64(image), 1, mode=mode)
  height, width = image.shape
  gx, gy = np.zeros((height, width)), np.zeros((height, width))
  for h in range(height):
    for w in range(width):
      window = padded[h:h + 3, w:w + 3]
      gx[h, w], gy[h, w] = np.sum(window * SOBEL_X), np.sum(window * SOBEL_X.T)
  scale = 1 / 8 if normalized else 1
  return gx * scale, gy * scale


def np_other_terms(outputs, batch):
  mask_p, depth_p = np_sigmoid(outputs["mask"]), np_sigmoid(outputs["depth"])
  mask_t, depth_t = np.float64(batch["mask"]), np.float64(batch["depth"])
  intersection = np.sum(mask_p * mask_t)
  union = np.sum(mask_p + mask_t) - intersection
  sobel_edge, hu = [], []
  for p, t in zip(depth_p[..., 0], depth_t[..., 0], strict=True):
    (pgx, pgy), (tgx, tgy) = np_sobel(p, "edge", True), np_sobel(t, "edge", True)
    sobel_edge.append(np.mean(np.abs(pgx - tgx) + np.abs(pgy - tgy)))
    (pgx, pgy), (tgx, tgy) = np_sobel(p, "constant", False), np_sobel(t, "constant", False)
    n_p = np.stack([-pgx, -pgy, np.ones_like(p)])
    n_t = np.stack([-tgx, -tgy, np.ones_like(t)])
    cosine = np.sum(n_p * n_t, 0) / np.linalg.norm(n_p, axis=0) / np.linalg.norm(n_t, axis=0)
    hu.append(np.mean(np.log(np.abs(p - t) + 0.5)) + np.mean(np.log(np.abs(pgx - tgx) + 0.5))
              + np.mean(np.log(np.abs(pgy - tgy) + 0.5)) + np.mean(np.abs(1 - cosine)))
  side_bce = sum(np_bce(outputs[f"{task}_sides"][..., k], batch[task][..., 0])
                 for task in ("mask", "depth") for k in range(6))
  return {"mask_iou": 1 - (intersection + 1e-6) / (union + 1e-6),
          "depth_bce": np_bce(outputs["depth"], depth_t), "depth_sobel_edge": np.mean(sobel_edge),
          "depth_hu": np.mean(hu), "side_bce": side_bce}


def test_other_seeds_terms_match_numpy():
  outputs, batch = random_inputs(seed=5, size=9)
  rng = np.random.default_rng(6)
  for task in ("mask", "depth"):
    outputs[f"{task}_sides"] = rng.normal(0, 2, (3, 9, 9, 6)).astype(np.float32)
  cfg = {name: 0.0 for name in losses.TERM_NAMES} | {"dice_per_image": False, "ssim_window": 3}
  expected = np_other_terms(outputs, batch)
  cfg.update({name: 1.0 for name in expected})
  total, terms = losses.compute_losses(outputs, batch, cfg)
  assert set(terms) == set(expected)
  for name, value in expected.items():
    np.testing.assert_allclose(float(terms[name]), value, rtol=2e-5, err_msg=name)
  np.testing.assert_allclose(float(total), sum(expected.values()), rtol=2e-5)


def test_side_bce_needs_side_outputs():
  outputs, batch = random_inputs()
  with pytest.raises(ValueError, match=r"loss.side_bce > 0 needs a model with side outputs"):
    losses.compute_losses(outputs, batch, loss_config(side_bce=1.0))
