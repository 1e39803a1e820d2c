"""The benchmark harness on a tiny config: its rows, its FLOP counts, its search for a batch.

Nothing here asserts a speed: the host is shared, so only the fields and their signs are checked.
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import HIDE_TENSORFLOW, REPO

from dmjax import losses, models
from dmjax.benchmark import flops, torch_side, training

COMMON_FIELDS = ("what", "images_per_sec", "device", "jax_version", "config", "batch_size",
                 "dtype", "load_avg_1m", "host_rss_mb", "host_peak_rss_mb",
                 "device_peak_memory_mb")
SPEC_SEED_GMAC_64 = 0.823  # SPEC §1: forward MACs per image of the seed model at 64 x 64.


# `python -m dmjax.benchmark ARGS` with TensorFlow absent, as on the accelerator machines.
_BENCHMARK_WITHOUT_TF = HIDE_TENSORFLOW + """
import runpy
runpy.run_module("dmjax.benchmark", run_name="__main__", alter_sys=True)
"""


def _run_benchmark(*args):
  # recipe=original: the default recipe's step (SSIM 11) alone takes ~50 s to compile on 2 cores.
  command = [sys.executable, "-c", _BENCHMARK_WITHOUT_TF, "--config=configs/r64.py:recipe=original",
             "--config.data.resolution=32", "--config.batch_size=2", "--repeats=1",
             "--repeat_seconds=0", *args]
  result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300,
                          check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  return [json.loads(line) for line in result.stdout.splitlines()]


def test_step_and_predict_rows_have_their_fields_and_positive_rates():
  rows = _run_benchmark("--what=step,augment,predict", "--models=depthmasknet",
                        "--predict_batch=2",
                        "--torch_variants=original,best", "--torch_compile=false")
  for row in rows:
    assert set(COMMON_FIELDS) <= set(row), row
    assert row["device_peak_memory_mb"] is None or row["device_peak_memory_mb"] > 0
    assert row["host_peak_rss_mb"] > 0
  steps = [r for r in rows if r["what"] == "step"]
  jax_rows = {r["variant"]: r for r in steps if r["framework"] == "jax"}
  assert set(jax_rows) == {"configured", "compare"}
  for row in jax_rows.values():
    assert row["images_per_sec"] > 0 and row["flops_per_image"] > 0
    assert 0 < row["fraction_of_peak"] and row["program_memory_mb"] > 0
  assert jax_rows["configured"]["optimizer"] == "sgd" and jax_rows["configured"]["loss"] == "config"
  (augment_row,) = [r for r in rows if r["what"] == "augment"]
  assert augment_row["images_per_sec"] > 0 and augment_row["source_resolution"] == 80
  assert jax_rows["compare"]["model"] == "depthmasknet"
  torch_rows = [r for r in steps if r["framework"] == "torch"]
  if any("note" in r for r in torch_rows):  # torch not installed: one row says so.
    assert len(torch_rows) == 1
  else:
    assert {r["variant"] for r in torch_rows} == {"original", "best"}
    assert all(r["images_per_sec"] > 0 and r["compile"] == "off" for r in torch_rows)
    assert jax_rows["compare"]["ratio_to_torch_original"] > 0
    assert jax_rows["compare"]["ratio_to_torch_best"] > 0
  predicts = [r for r in rows if r["what"] == "predict"]
  assert sorted(r["batch_size"] for r in predicts) == [1, 2]
  assert all(r["images_per_sec"] > 0 and r["latency_ms"] > 0 for r in predicts)


def test_xla_flops_of_the_seed_model_match_spec():
  # XLA skips the taps that land on zero padding; SPEC §1 (ptflops) counts them. At 64 px the
  # seed's padded taps are 8.2% of its MACs (most in the 8 x 8 dilated convs of encode4).
  model = models.create_model(training.compare_config(
      _r64_config(), "depthmasknet", "float32").model)
  images = jnp.zeros((1, 64, 64, 3), jnp.float32)
  variables = model.init(jax.random.PRNGKey(0), images, images)
  forward = jax.jit(lambda v, a, b: model.apply(v, a, b)).lower(variables, images, images)
  ratio = flops.compiled_flops(forward.compile()) / (2 * SPEC_SEED_GMAC_64 * 1e9)
  assert 0.91 < ratio < 0.93


def _r64_config():
  from dmjax import config as config_lib

  return config_lib.stage_config(64, None)


def test_peak_table_matches_device_kinds():
  assert flops.table_peak_flops("NVIDIA H100 80GB HBM3", "bfloat16") == 989e12
  assert flops.table_peak_flops("NVIDIA H100 PCIe", "float32") == 378e12
  assert flops.table_peak_flops("NVIDIA A100-SXM4-40GB", "bfloat16") == 312e12
  assert flops.table_peak_flops("Tesla P100-PCIE-16GB", "bfloat16") is None
  assert flops.table_peak_flops("cpu", "float32") is None


@pytest.mark.parametrize("start", [1, 64])
@pytest.mark.parametrize("limit", [1, 7, 100, 1000])
def test_largest_fitting_batch_brackets_the_limit(limit, start):
  good, bad = training.largest_fitting_batch(lambda b: b <= limit, start=start, multiple=1)
  assert good <= limit < bad
  assert bad - good <= max(1, good // 32)


def test_largest_fitting_batch_keeps_multiples_and_refuses_when_none_fits():
  tried = []

  def fits(batch):
    tried.append(batch)
    return batch <= 20

  good, bad = training.largest_fitting_batch(fits, start=64, multiple=4)
  assert good <= 20 < bad and bad - good <= 4
  assert all(batch % 4 == 0 for batch in tried)
  with pytest.raises(ValueError, match="batch 4 does not fit"):
    training.largest_fitting_batch(lambda b: False, start=64, multiple=4)


def test_torch_loss_is_the_compare_loss():
  torch = pytest.importorskip("torch")
  rng = np.random.default_rng(0)
  batch = training.random_batch(2, 16)
  logits = {k: rng.standard_normal((2, 16, 16, 1)).astype(np.float32) for k in ("mask", "depth")}
  expected, _ = losses.compute_losses(logits, batch, torch_side.COMPARE_LOSS)
  as_torch = lambda x: torch.from_numpy(x).permute(0, 3, 1, 2)
  got = sum(torch_side.torch_bce_dice(as_torch(logits[k]), as_torch(batch[k]))
            for k in ("mask", "depth"))
  np.testing.assert_allclose(float(got), float(expected), rtol=1e-5)


def test_video_and_serve_rows_measure_the_commands_paths():
  from dmjax import benchmark
  from dmjax import config as config_lib

  config = config_lib.base_config()
  config.data.resolution = 32
  settings = benchmark.Settings(what=["video", "serve"], video_size="48x32", video_frames=4,
                                video_batch=2, serve_size=32, serve_clients=["2"], seconds=1.0)
  rows = list(benchmark.run(config, settings, "base"))
  assert [r["what"] for r in rows] == ["video", "serve"]
  video, serve = rows
  assert set(COMMON_FIELDS) <= set(video) and set(COMMON_FIELDS) <= set(serve)
  assert video["frames"] == 4 and (video["width"], video["height"]) == (48, 32)
  assert video["images_per_sec"] == video["frames_per_second"] > 0
  assert serve["concurrency"] == 2 and serve["requests"] > 0 and serve["requests_per_s"] > 0


def test_serve_sizes_row_compiles_nothing_after_the_warm_up():
  from dmjax import benchmark
  from dmjax import config as config_lib
  from dmjax.benchmark import inference_rows

  config = config_lib.base_config()
  config.data.resolution = 32
  settings = benchmark.Settings(what=["serve_sizes"], sizes_requests=4, sizes_count=2,
                                sizes_min_side=40, sizes_max_side=90, sizes_clients=2,
                                sizes_batch=1)
  (row,) = benchmark.run(config, settings, "base")
  assert set(COMMON_FIELDS) <= set(row)
  assert (row["requests"], row["answered"], row["failed"], row["distinct_sizes"]) == (4, 4, 0, 2)
  assert row["compiled_after_warm_up"] == row["programs_after_warm_up"] == 0
  assert 0 < row["latency_p50_s"] <= row["latency_p99_s"] <= row["latency_max_s"]
  assert row["requests_per_s"] > 0 and row["process_peak_rss_mb"] > 0
  sizes = inference_rows.photo_sizes(50, 240, 4000)
  assert len(set(sizes)) == 50 and all(240 <= side <= 4000 for size in sizes for side in size)
  assert sizes == inference_rows.photo_sizes(50, 240, 4000)  # Seeded.


def test_run_row_reads_the_main_jobs_log_and_its_process_figures(tmp_path):
  from dmjax.benchmark import run_rows

  log = ("I1207 train.py:1] step 50/200  loss 0.9  1.10 steps/s  35 images/s  ETA 2:00\n"
         "I1207 train.py:1] step 100/200  loss 0.8  2.00 steps/s  64 images/s  ETA 1:00\n"
         "I1207 train.py:1] step 150/200  loss 0.7  2.20 steps/s  70 images/s  ETA 0:30\n"
         "I1207 train.py:1] step 200/200  loss 0.6  2.40 steps/s  77 images/s  ETA 0:00\n")
  assert run_rows.steady_steps_per_sec(log) == 2.2  # The first window (compiling) left out.
  assert run_rows.steady_steps_per_sec("no progress") is None
  figures = run_rows._process_figures(os.getpid())
  assert figures["user_s"] > 0 and figures["minor_faults"] > 0 and figures["child_peak_rss_mb"] > 0
  env = run_rows._environment("system", str(tmp_path))
  assert "LD_PRELOAD" not in env and env["DMJAX_ALLOCATOR"] == "system"
  assert env["PYTHONPATH"].split(os.pathsep)[0] == str(tmp_path)


@pytest.mark.slow
def test_run_row_times_the_main_job_to_the_end_of_its_training(tiny_data_config):
  from dmjax import benchmark
  from dmjax.benchmark import run_rows

  config = tiny_data_config.copy_and_resolve_references()
  config.log_every_steps = 1
  settings = benchmark.Settings(what=["run"], run_steps=3, run_allocators=["system"])
  (row,) = benchmark.run(config, settings, "tiny")
  assert set(COMMON_FIELDS) <= set(row)
  assert (row["allocator"], row["source"], row["steps"]) == ("system", "installed", 3)
  assert row["steps_per_sec"] > 0 and row["images_per_sec"] == pytest.approx(
      row["steps_per_sec"] * config.batch_size, rel=0.01)
  assert 0 < row["system_s"] < row["user_s"] + row["system_s"] and row["minor_faults"] > 0
  assert run_rows.run_config(config, 3).num_train_steps == 3
