"""Every metric against an independent float64 numpy computation written here."""

import json
import os
import subprocess
import sys

import jax
import numpy as np

from dmjax.data.schema import DEPTH_VALID_MIN
from dmjax.evaluation import metrics

DEPTH_KEYS = ("depth_mae", "depth_rmse", "depth_abs_rel", "depth_sq_rel", "depth_rmse_log",
              "depth_log10", "depth_delta1", "depth_delta2", "depth_delta3")
ALL_KEYS = {"mask_dice", "mask_iou", "mask_dice_per_image", "mask_iou_per_image", "mask_mae",
            "checkerboard", *DEPTH_KEYS, *(k + "_aligned" for k in DEPTH_KEYS)}

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_jitted_compute_metrics = jax.jit(metrics.compute_metrics)


def compute_metrics(mask_prob, depth_pred, batch):
  """Jitted, always with `example_weight`, so that equal shapes share one compilation."""
  batch = dict(batch)
  batch.setdefault("example_weight", np.ones(len(mask_prob), np.float32))
  return _jitted_compute_metrics(mask_prob, depth_pred, batch)


def computed(collection):
  return {k: float(v) for k, v in collection.compute().items()}


def random_batch(seed, batch_size=4, size=16):
  rng = np.random.default_rng(seed)
  shape = (batch_size, size, size, 1)
  mask_prob = rng.random(shape).astype(np.float32)
  mask = (rng.random(shape) > 0.6).astype(np.float32)
  mask[0] = np.clip(mask[0] + 0.3 * rng.random(shape[1:]), 0, 1)  # A soft label.
  depth = rng.random(shape).astype(np.float32)
  depth[depth < 0.05] = 0.0  # Invalid pixels.
  depth_pred = np.clip(depth + 0.2 * rng.normal(size=shape), 0, 1).astype(np.float32)
  return mask_prob, depth_pred, {"mask": mask, "depth": depth}


# The independent reference: float64, one image at a time, dropping weight-0 examples.


def np_depth_metrics(pred, true):
  """Eigen et al. metrics over 1-D arrays of valid pixels."""
  clipped = np.clip(pred, DEPTH_VALID_MIN, 1.0)
  ratio = np.maximum(clipped / true, true / clipped)
  result = {
      "depth_mae": np.mean(np.abs(pred - true)),
      "depth_rmse": np.sqrt(np.mean((pred - true) ** 2)),
      "depth_abs_rel": np.mean(np.abs(clipped - true) / true),
      "depth_sq_rel": np.mean((clipped - true) ** 2 / true),
      "depth_rmse_log": np.sqrt(np.mean((np.log(clipped) - np.log(true)) ** 2)),
      "depth_log10": np.mean(np.abs(np.log10(clipped) - np.log10(true))),
  }
  for k in (1, 2, 3):
    result[f"depth_delta{k}"] = np.mean(ratio < 1.25**k)
  return result


def np_nyquist_energy(image):
  h, w = image.shape
  window = np.outer(np.sin(np.pi * (np.arange(h) + 0.5) / h) ** 2,
                    np.sin(np.pi * (np.arange(w) + 0.5) / w) ** 2)
  spectrum = np.fft.fft2(window * image) / window.sum()
  bins = (spectrum[0, w // 2], spectrum[h // 2, 0], spectrum[h // 2, w // 2])
  return sum(abs(b) ** 2 for b in bins)


def np_reference(mask_prob, depth_pred, batch):
  weight = batch.get("example_weight", np.ones(len(mask_prob)))
  keep = [i for i in range(len(mask_prob)) if weight[i] > 0]
  mask_prob, depth_pred = np.float64(mask_prob[keep, ..., 0]), np.float64(depth_pred[keep, ..., 0])
  mask, depth = np.float64(batch["mask"][keep, ..., 0]), np.float64(batch["depth"][keep, ..., 0])

  tp = fp = fn = 0
  dice_per_image, iou_per_image = [], []
  for p, t in zip(mask_prob > 0.5, mask > 0.5, strict=True):
    image_tp, image_fp, image_fn = np.sum(p & t), np.sum(p & ~t), np.sum(~p & t)
    tp, fp, fn = tp + image_tp, fp + image_fp, fn + image_fn
    if image_tp + image_fp + image_fn == 0:
      dice_per_image.append(1.0)
      iou_per_image.append(1.0)
    else:
      dice_per_image.append(2 * image_tp / (2 * image_tp + image_fp + image_fn))
      iou_per_image.append(image_tp / (image_tp + image_fp + image_fn))
  result = {
      "mask_dice": 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 1.0,
      "mask_iou": tp / (tp + fp + fn) if tp + fp + fn else 1.0,
      "mask_dice_per_image": np.mean(dice_per_image),
      "mask_iou_per_image": np.mean(iou_per_image),
      "mask_mae": np.mean(np.abs(mask_prob - mask)),
  }

  valid_pred, valid_aligned, valid_true = [], [], []
  for p, t in zip(depth_pred, depth, strict=True):
    valid = t >= DEPTH_VALID_MIN
    design = np.stack([p[valid], np.ones(valid.sum())], axis=1)
    coefficients = np.linalg.lstsq(design, t[valid], rcond=None)[0]
    valid_pred.append(p[valid])
    valid_aligned.append(design @ coefficients)
    valid_true.append(t[valid])
  valid_true = np.concatenate(valid_true)
  result.update(np_depth_metrics(np.concatenate(valid_pred), valid_true))
  aligned = np_depth_metrics(np.concatenate(valid_aligned), valid_true)
  result.update({k + "_aligned": v for k, v in aligned.items()})

  pred_energy = sum(np_nyquist_energy(p) for p in depth_pred)
  true_energy = sum(np_nyquist_energy(t) for t in depth)
  result["checkerboard"] = (pred_energy + 1e-10) / (true_energy + 1e-10)
  return result


def assert_metrics_close(actual, expected, keys=None):
  for key in keys or expected:
    np.testing.assert_allclose(actual[key], expected[key], rtol=2e-5, atol=1e-6, err_msg=key)


def test_random_batch_matches_numpy():
  mask_prob, depth_pred, batch = random_batch(0)
  result = computed(compute_metrics(mask_prob, depth_pred, batch))
  assert set(result) == ALL_KEYS
  assert_metrics_close(result, np_reference(mask_prob, depth_pred, batch))


def test_edge_cases_match_numpy():
  mask_prob, depth_pred, batch = random_batch(1, batch_size=8)
  batch["mask"][0] = 0.0  # Empty label, empty prediction: scores 1.
  mask_prob[0] = 0.2
  batch["mask"][1] = 0.0  # Empty label, some prediction: scores 0.
  batch["mask"][2] = 1.0  # All foreground, all predicted.
  mask_prob[2] = 0.9
  depth_pred[3] = 0.37  # A constant prediction: aligned, it becomes the mean truth.
  batch["depth"][4] = 0.6  # A constant truth.
  batch["depth"][5, 2:] = 0.0  # Mostly invalid.
  result = computed(compute_metrics(mask_prob, depth_pred, batch))
  assert_metrics_close(result, np_reference(mask_prob, depth_pred, batch))


def test_per_image_overlap_conventions():
  shape = (4, 16, 16, 1)
  mask = np.zeros(shape, np.float32)
  mask_prob = np.zeros(shape, np.float32)
  # Image 0: empty label, nothing predicted. Image 1: empty label, 32 false positives.
  mask_prob[1, :2] = 1.0
  mask[2] = 1.0  # Image 2: all foreground, half found.
  mask_prob[2, :8] = 1.0
  mask[3] = 1.0  # Image 3: all foreground, all found.
  mask_prob[3] = 1.0
  depth = np.full(shape, 0.5, np.float32)
  result = computed(compute_metrics(mask_prob, depth, {"mask": mask, "depth": depth}))
  np.testing.assert_allclose(result["mask_dice_per_image"],
                             (1 + 0 + 2 * 128 / (256 + 128) + 1) / 4, rtol=1e-6)
  np.testing.assert_allclose(result["mask_iou_per_image"], (1 + 0 + 0.5 + 1) / 4, rtol=1e-6)
  np.testing.assert_allclose(result["mask_iou"], (128 + 256) / (128 + 256 + 32 + 128), rtol=1e-6)

  empty = computed(compute_metrics(np.zeros(shape), depth, {"mask": np.zeros(shape),
                                                            "depth": depth}))
  for key in ("mask_dice", "mask_iou", "mask_dice_per_image", "mask_iou_per_image"):
    assert empty[key] == 1.0


def test_padding_and_weights():
  mask_prob, depth_pred, batch = random_batch(2)
  padding_weight = np.array([1, 1, 1, 0], np.float32)
  # Padding may hold anything, even NaN: weight 0 keeps it out of every metric.
  padded_mask_prob, padded_depth_pred = mask_prob.copy(), depth_pred.copy()
  padded_mask_prob[3] = np.nan
  padded_depth_pred[3] = np.nan
  padded = computed(compute_metrics(padded_mask_prob, padded_depth_pred,
                                    dict(batch, example_weight=padding_weight)))
  assert_metrics_close(padded, np_reference(mask_prob, depth_pred,
                                            dict(batch, example_weight=padding_weight)))

  # Weight 2 counts an example twice.
  weighted = computed(compute_metrics(
      mask_prob, depth_pred, dict(batch, example_weight=np.array([1, 2, 1, 0], np.float32))))
  order = [0, 1, 1, 2]
  doubled = computed(compute_metrics(mask_prob[order], depth_pred[order],
                                     {k: v[order] for k, v in batch.items()}))
  assert_metrics_close(weighted, doubled)


def test_merge_equals_concatenation():
  first = random_batch(3)
  second = random_batch(4)
  second[2]["example_weight"] = np.array([1, 1, 1, 0], np.float32)
  first[2]["example_weight"] = np.ones(4, np.float32)
  merged = compute_metrics(*first).merge(compute_metrics(*second))
  concatenated = [np.concatenate([a, b]) for a, b in zip(first[:2], second[:2], strict=True)]
  concatenated_batch = {k: np.concatenate([first[2][k], second[2][k]]) for k in first[2]}
  whole = computed(compute_metrics(*concatenated, concatenated_batch))
  assert_metrics_close(computed(merged), whole)
  assert_metrics_close(computed(merged), np_reference(*concatenated, concatenated_batch))
  # Merging into the empty collection changes nothing.
  assert_metrics_close(computed(metrics.EvalMetrics.empty().merge(merged)), whole)


def test_alignment_recovers_affine_predictions():
  _, _, batch = random_batch(5)
  valid = batch["depth"] >= DEPTH_VALID_MIN
  scales = np.array([0.5, 2.0, -1.0, 1.0], np.float32)[:, None, None, None]
  shifts = np.array([0.3, -0.1, 1.0, 0.0], np.float32)[:, None, None, None]
  depth_pred = np.where(valid, (batch["depth"] - shifts) / scales, 0.5).astype(np.float32)
  result = computed(compute_metrics(batch["mask"], depth_pred, batch))
  assert result["depth_rmse_aligned"] < 1e-5
  assert result["depth_delta1_aligned"] == 1.0
  assert result["depth_rmse"] > 0.1


def test_constant_prediction_aligns_to_mean_truth():
  _, _, batch = random_batch(6)
  depth_pred = np.full_like(batch["depth"], 0.25)
  depth_pred[1] = 0.0
  depth_pred[2] = 1.0
  valid = batch["depth"] >= DEPTH_VALID_MIN
  aligned = np.asarray(jax.jit(metrics.align_scale_and_shift)(depth_pred, batch["depth"], valid))
  for k in range(4):
    np.testing.assert_allclose(aligned[k], np.mean(batch["depth"][k][valid[k]]), rtol=1e-6)
  assert np.all(np.isfinite(list(computed(compute_metrics(batch["mask"], depth_pred,
                                                          batch)).values())))


def test_checkerboard():
  size = 16
  rows, cols = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
  smooth = 0.5 + 0.3 * np.sin(rows / 5.0) * np.cos(cols / 7.0)
  truth = np.stack([smooth, smooth.T, 1 - smooth, cols / size])[..., None].astype(np.float32)
  batch = {"mask": np.zeros_like(truth), "depth": truth}
  assert computed(compute_metrics(batch["mask"], truth, batch))["checkerboard"] == 1.0

  epsilon = 0.02
  grid = np.where((rows + cols) % 2 == 0, epsilon, -epsilon)[None, :, :, None]
  checkered = (truth + grid).astype(np.float32)
  score = computed(compute_metrics(batch["mask"], checkered, batch))["checkerboard"]
  assert score > 100, score
  np.testing.assert_allclose(score, np_reference(batch["mask"], checkered, batch)["checkerboard"],
                             rtol=1e-4)
  # Row stripes (period 2 in y only) count too.
  striped = (truth + np.where(rows % 2 == 0, epsilon, -epsilon)[None, :, :, None]).astype(
      np.float32)
  striped_score = computed(compute_metrics(batch["mask"], striped, batch))["checkerboard"]
  assert striped_score > 100, striped_score


# Runs with 4 forced CPU devices (a fresh process: the device count is fixed when JAX starts):
# the batch sharded over them, each shard's statistics summed over the axis with `psum`, and each
# shard's own copy of the result returned, stacked along the axis.
_SHARD_MAP_SCRIPT = """
import json, sys
import jax, numpy as np
from jax.sharding import PartitionSpec as P
from dmjax.evaluation import metrics

arrays = dict(np.load(sys.argv[1]))
mask_prob, depth_pred = arrays.pop("mask_prob"), arrays.pop("depth_pred")
mesh = jax.make_mesh((jax.device_count(),), ("shards",),
                     axis_types=(jax.sharding.AxisType.Auto,))

def per_shard(mask_prob, depth_pred, batch):
  collection = metrics.compute_metrics(mask_prob, depth_pred, batch, axis_name="shards")
  return jax.tree.map(lambda x: x[None], collection)  # This shard's copy, one row per shard.

inputs = jax.device_put((mask_prob, depth_pred, arrays),
                        jax.sharding.NamedSharding(mesh, P("shards")))
assert len(inputs[0].sharding.device_set) == jax.device_count()
stacked = jax.jit(jax.shard_map(per_shard, mesh=mesh, in_specs=P("shards"),
                                out_specs=P("shards")))(*inputs)
rows = [{k: float(v) for k, v in jax.tree.map(lambda x: x[i], stacked).compute().items()}
        for i in range(jax.device_count())]
print(json.dumps({"devices": jax.device_count(), "shards": rows}))
"""


def test_shard_map_reduction_gives_every_shard_the_whole_batch_metrics(tmp_path):
  mask_prob, depth_pred, batch = random_batch(7, batch_size=8)
  # Padding in two shards, one of them all padding: their sums must still add up.
  batch["example_weight"] = np.array([1, 1, 1, 0, 1, 1, 0, 0], np.float32)
  whole = computed(compute_metrics(mask_prob, depth_pred, batch))
  np.savez(tmp_path / "batch.npz", mask_prob=mask_prob, depth_pred=depth_pred, **batch)
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4")
  result = subprocess.run([sys.executable, "-c", _SHARD_MAP_SCRIPT, str(tmp_path / "batch.npz")],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  shards = json.loads(result.stdout.splitlines()[-1])
  assert shards["devices"] == 4 and len(shards["shards"]) == 4
  for index, row in enumerate(shards["shards"]):
    assert row.keys() == whole.keys(), index
    assert_metrics_close(row, whole)
