"""The main job end to end on a tiny config: training, resume, devices, stages, failures."""

import glob
import json
import logging
import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import copy_of, relative_update_difference
from conftest import tiny_run_config as tiny

from dmjax import checkpoints, errors, preemption, summaries, train

metric_writers = summaries.metric_writers()  # CLU's, importable without TensorFlow too.

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class RecordingWriter(metric_writers.MetricWriter):
  """Keeps what training writes, and can send SIGTERM to this process at one step."""

  def __init__(self, sigterm_at_step=None):
    self.scalars, self.images, self.hparams = {}, {}, {}
    self.sigterm_at_step = sigterm_at_step

  def write_scalars(self, step, scalars):
    self.scalars.setdefault(step, {}).update(scalars)
    if step == self.sigterm_at_step:
      os.kill(os.getpid(), signal.SIGTERM)

  def write_images(self, step, images):
    self.images.setdefault(step, {}).update(images)

  def write_hparams(self, hparams):
    self.hparams.update(hparams)

  def write_texts(self, step, texts):
    pass

  def write_summaries(self, step, values, metadata=None):
    pass

  def write_audios(self, step, audios, *, sample_rate):
    pass

  def write_videos(self, step, videos):
    pass

  def write_histograms(self, step, arrays, num_buckets=None):
    pass

  def flush(self):
    pass

  def close(self):
    pass


def final_params(workdir):
  return checkpoints.restore_model(workdir)[1]["params"]


def assert_trees_equal(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(x, y)


def test_training_writes_checkpoints_events_and_final_metrics(trained):
  config, workdir, results = trained
  steps = sorted(int(os.path.basename(p)) for p in glob.glob(f"{workdir}/checkpoints/[0-9]*"))
  assert steps == [2, 4, 6]  # Every 2 steps, keeping the last 3.
  assert glob.glob(f"{workdir}/events.out.tfevents.*")
  with open(f"{workdir}/final_metrics.json") as f:
    saved = json.load(f)
  assert saved == pytest.approx(results)
  for key in ("mask_iou", "mask_dice", "depth_rmse", "depth_rmse_aligned", "depth_abs_rel",
              "depth_delta1", "checkerboard", "baseline_mask_iou", "baseline_depth_rmse",
              "baseline_depth_rmse_aligned"):
    assert np.isfinite(saved[key]), key
  assert 0 <= saved["mask_iou"] <= 1 and 0 <= saved["baseline_mask_iou"] <= 1


def test_one_step_logs_every_loss_term_and_images(tiny_data_config, tmp_path):
  writer = RecordingWriter()
  # Fed with examples decoded as they are gathered (not predecoded), the other way to feed it.
  config = tiny(tiny_data_config, num_train_steps=1, log_every_steps=1, eval_every_steps=1,
                **{"data.predecoded": False})
  train.train_and_evaluate(config, str(tmp_path), writer=writer)
  logged = writer.scalars[1]
  for key in ("train/total", "train/mask_bce", "train/mask_dice", "train/depth_l1",
              "train/depth_ssim", "train/depth_edge", "train/learning_rate",
              "train/images_per_sec", "final/mask_iou", "final/baseline_mask_iou"):
    assert key in logged, key
  grid = writer.images[1]["examples"]
  assert grid.dtype == np.uint8 and grid.ndim == 4 and grid.shape[-1] == 3
  assert writer.hparams["model.name"] == config.model.name


def test_sigterm_between_checkpoints_saves_where_it_stops_and_resumes_bit_identically(
    trained, tmp_path, caplog):
  # The signal lands in the host work of step 3 (its logging), after that step's save decision;
  # neither step 3 nor step 4 is a checkpoint step. The run stops at the next step, 4, and must
  # save it, not merely say so. (How often a run logs or saves does not change what it trains.)
  config, uninterrupted, _ = trained
  workdir = str(tmp_path)
  interrupted = tiny(config, log_every_steps=1, checkpoint_every_steps=5)
  writer = RecordingWriter(sigterm_at_step=3)
  with caplog.at_level(logging.WARNING), pytest.raises(preemption.Preempted, match="step 4"):
    train.train_and_evaluate(interrupted, workdir, writer=writer)
  assert "Saved step 4 after SIGTERM" in caplog.text
  assert max(writer.scalars) == 4
  assert sorted(int(os.path.basename(p)) for p in glob.glob(f"{workdir}/checkpoints/[0-9]*")) == [4]
  train.train_and_evaluate(interrupted, workdir, writer=RecordingWriter())
  assert_trees_equal(final_params(workdir), final_params(uninterrupted))


def test_two_devices_match_one_device_and_start_from_init_from(one_device_run, tmp_path):
  config, one_device = one_device_run
  config_path = tmp_path / "config.json"
  config_path.write_text(config.to_json())
  run, stage = tmp_path / "run", tmp_path / "next_stage"
  # Then a next stage on the same two devices from the one-device run: its parameters are
  # placed replicated on the mesh, as the state they replace.
  script = (
      "import sys, json, jax, ml_collections\n"
      "from dmjax import models, parallel, train\n"
      "config = ml_collections.ConfigDict(json.loads(open(sys.argv[1]).read()))\n"
      "train.train_and_evaluate(config, sys.argv[2])\n"
      "config.init_from, config.num_train_steps = sys.argv[3], 1\n"
      "mesh, model = parallel.create_mesh(), models.create_model(config.model)\n"
      "state = jax.device_put(train.create_train_state(config, model, train.create_optimizer("
      "config), jax.random.PRNGKey(1)), parallel.replicated(mesh))\n"
      "loaded = train.load_previous_stage(state, config)\n"
      "for leaf in jax.tree.leaves(loaded.variables):\n"
      "  assert leaf.sharding == parallel.replicated(mesh), leaf.sharding\n"
      "train.train_and_evaluate(config, sys.argv[4])\n")
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
             JAX_PLATFORMS="cpu")
  result = subprocess.run([sys.executable, "-c", script, str(config_path), str(run), one_device,
                           str(stage)], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  one, two = (checkpoints.restore_model(workdir)[1] for workdir in (one_device, str(run)))
  difference = relative_update_difference(config, one, two)
  assert difference < 1e-3, difference
  assert checkpoints.restore_model(str(stage))[2] == 1


def test_init_from_loads_previous_stage(trained, tiny_data_config):
  _, previous, _ = trained
  config = tiny(tiny_data_config, init_from=previous)
  model = train.models.create_model(config.model)
  tx = train.create_optimizer(config)
  fresh = train.create_train_state(config, model, tx, jax.random.PRNGKey(1))
  loaded = train.load_previous_stage(fresh, config)
  assert_trees_equal(loaded.params, final_params(previous))
  assert int(loaded.step) == 0  # A fresh optimizer and schedule.


def test_checkpoint_of_another_model_is_refused(trained, tiny_data_config):
  _, workdir, _ = trained
  config = tiny(tiny_data_config, **{"model.name": "depthmasknet", "init_from": workdir})
  model = train.models.create_model(config.model)
  tx = train.create_optimizer(config)
  fresh = train.create_train_state(config, model, tx, jax.random.PRNGKey(1))
  with pytest.raises(ValueError, match="trained depthmasknet_v2, not depthmasknet"):
    train.load_previous_stage(fresh, config)
  config.init_from = ""  # Resuming the other model's workdir names the first differing key.
  with pytest.raises(ValueError,
                     match=r"checkpoint .*/checkpoints/6: (params|batch_stats)/\S+ has shape"):
    train.train_and_evaluate(config, workdir, writer=RecordingWriter())


def test_non_finite_update_stops_before_it_is_saved_and_keeps_the_step_before(
    tiny_data_config, tmp_path):
  # SGD whose rate turns infinite at step 3: that step's loss and gradient (of step 2's
  # parameters) are finite, the parameters it makes are not. Step 3, a checkpoint step, must not
  # be saved: step 2 stays the last checkpoint.
  config = tiny(tiny_data_config, num_train_steps=6, checkpoint_every_steps=1,
                **{"optimizer.name": "sgd", "optimizer.learning_rate": 0.05,
                   "optimizer.grad_clip_norm": 0.0, "optimizer.schedule": "step",
                   "optimizer.step_every": 2, "optimizer.step_factor": float("inf")})
  with pytest.raises(errors.NonFiniteLossError,
                     match=r"at step 3: .*grad_norm=[0-9.e+-]+, .*param_norm=(inf|nan), "
                           r"total=[0-9.e+-]+;"):
    train.train_and_evaluate(config, str(tmp_path), writer=RecordingWriter())
  _, variables, step = checkpoints.restore_model(str(tmp_path))
  assert step == 2
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(variables))


def test_unknown_config_key_is_refused(tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "dmjax.main", "--config=configs/r64.py",
       "--config.no_such_key=1", f"--workdir={tmp_path}"],
      cwd=REPO, capture_output=True, text=True)
  assert result.returncode != 0
  assert "no_such_key" in result.stderr


def test_resuming_with_another_config_warns_naming_the_keys(tiny_data_config, caplog):
  saved = tiny_data_config.copy_and_resolve_references()
  now = tiny(saved, num_train_steps=9, **{"optimizer.learning_rate": 0.5})
  with caplog.at_level(logging.WARNING):
    train.warn_about_config_changes(saved, saved)
    assert not caplog.text
    train.warn_about_config_changes(saved, now)
  assert "num_train_steps: 3000 -> 9" in caplog.text
  assert "optimizer.learning_rate: 0.002 -> 0.5" in caplog.text


def test_intervals_of_zero_mean_never(tiny_data_config, tmp_path):
  # What `schedule=full` derives for runs under 20 steps; it used to divide by zero.
  config = tiny(tiny_data_config, log_every_steps=0, eval_every_steps=0, checkpoint_every_steps=0)
  writer = RecordingWriter()
  train.train_and_evaluate(config, str(tmp_path), writer=writer)
  assert os.listdir(tmp_path / "checkpoints") == ["6"]  # The last step only.
  assert sorted(writer.scalars) == [6]  # Logged, evaluated (final) and saved at the end only.
  assert sorted(writer.images) == [6]


def losses_on_one_batch(config, batch, num_steps):
  """The total loss at each of `num_steps` steps that all train on `batch`, and the final state."""
  from dmjax import models, parallel

  mesh = parallel.create_mesh()
  model = models.create_model(config.model)
  tx = train.create_optimizer(config)
  state = jax.device_put(train.create_train_state(config, model, tx, jax.random.PRNGKey(0)),
                         parallel.replicated(mesh))
  step = train.make_train_step(model, tx, config.loss, mesh)
  batch = parallel.to_global(batch, parallel.batch_sharding(mesh))
  totals = []
  for _ in range(num_steps):
    state, terms = step(state, batch)
    totals.append(float(terms["total"]))
  return np.array(totals), state


@pytest.mark.slow
def test_a_few_dozen_steps_on_one_batch_cut_the_loss_in_float32_and_bfloat16(tiny_data_config):
  # Catches a sign error, an update that is dropped, or a bfloat16 step that trains differently.
  from dmjax.data import pipeline

  config = tiny(tiny_data_config, num_train_steps=40)  # AdamW 2e-3, cosine after 2 warm-up steps.
  batch = next(pipeline.create_eval_batches(config, "train", 4, batch_size=4))
  float32, _ = losses_on_one_batch(config, batch, 40)
  assert float32[-1] < 0.6 * float32[0], float32  # 0.42 seen.
  bfloat16, state = losses_on_one_batch(copy_of(config, **{"model.dtype": "bfloat16"}), batch, 40)
  assert bfloat16[-1] < 0.6 * bfloat16[0], bfloat16
  np.testing.assert_allclose(bfloat16, float32, rtol=0.03)  # Within 0.5 % seen.
  assert {leaf.dtype for leaf in jax.tree.leaves((state.params, state.batch_stats,
                                                  state.opt_state))} <= {np.dtype(np.float32),
                                                                         np.dtype(np.int32)}


def test_evaluations_reuse_one_compiled_model_and_logging_fetches_once_per_window(
    tiny_data_config, tmp_path, monkeypatch):
  from dmjax.evaluation import evaluator

  # Every call of the model's prediction outside jit, and every trace inside it, lands here.
  calls = []
  real_predict = evaluator.predict

  def counting_predict(model, variables, batch):
    calls.append(all(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(variables)))
    return real_predict(model, variables, batch)

  monkeypatch.setattr(evaluator, "predict", counting_predict)
  # The loss terms of every step, read here; and the fetches of loss terms training makes.
  per_step = []
  real_make_train_step = train.make_train_step

  def recording_make_train_step(*args, **kwargs):
    step_fn = real_make_train_step(*args, **kwargs)

    def step(state, batch):
      state, terms = step_fn(state, batch)
      per_step.append({k: float(np.asarray(v)) for k, v in terms.items()})
      return state, terms

    return step

  monkeypatch.setattr(train, "make_train_step", recording_make_train_step)
  fetches = []
  real_device_get = jax.device_get

  def counting_device_get(tree):
    if "'total'" in str(jax.tree_util.tree_structure(tree)):
      fetches.append(tree)
    return real_device_get(tree)

  monkeypatch.setattr(jax, "device_get", counting_device_get)

  writer = RecordingWriter()
  # A data folder given relative to the working directory (unused by the synthetic source).
  monkeypatch.chdir(tmp_path)
  config = tiny(tiny_data_config, num_train_steps=4, log_every_steps=2, eval_every_steps=1,
                checkpoint_every_steps=0, **{"data.dir": "photos"})
  train.train_and_evaluate(config, str(tmp_path), writer=writer)
  # Saved absolute: the tools that read the run find it from any working directory.
  assert checkpoints.restore_model(str(tmp_path))[0].data.dir == str(tmp_path / "photos")
  assert sorted(writer.images) == [1, 2, 3, 4]  # Four evaluations, each with example images.
  # Traced once by the evaluation step and once by the example images, both jitted.
  assert calls == [True, True]
  assert len(fetches) == 2  # Steps 2 and 4: one fetch per log window, not one per step.
  for logged_step, steps in ((2, per_step[0:2]), (4, per_step[2:4])):
    logged = writer.scalars[logged_step]
    for key in steps[0]:
      assert logged["train/" + key] == pytest.approx(np.mean([s[key] for s in steps]),
                                                     rel=1e-6), key


def test_the_first_non_finite_step_of_a_log_window_is_named():
  terms = [{"total": np.float32(1.0), "grad_norm": np.float32(2.0)},
           {"total": np.float32(np.nan), "grad_norm": np.float32(3.0)},
           {"total": np.float32(np.inf), "grad_norm": np.float32(4.0)}]
  window = None
  for step, step_terms in enumerate(terms, start=7):
    window = train.accumulate_terms(window, step, step_terms)
  with pytest.raises(errors.NonFiniteLossError, match=r"at step 8: grad_norm=3, total=nan"):
    train.read_window(window, 3)
  window = train.accumulate_terms(None, 1, terms[0])
  window = train.accumulate_terms(window, 2, {"total": np.float32(3.0),
                                              "grad_norm": np.float32(0.0)})
  assert train.read_window(window, 2) == {"total": 2.0, "grad_norm": 1.0}
