"""The evaluate tool on the shared tiny run, and the boundary F-score it adds."""

import glob
import json
import os
import shutil

import numpy as np
import pytest
import scipy.ndimage as ndi
from PIL import Image
from test_original_layout import add_composites, layout_files, write_folders

from dmjax import checkpoints, evaluate, inference
from dmjax.evaluation import metrics


def reference_boundary_f(mask_prob, mask_true, radius):
  """DAVIS's F per image from scipy's erosion and exact Euclidean distance transform."""
  scores = []
  for pred, true in zip(mask_prob > 0.5, mask_true > 0.5, strict=True):
    pred_edge = pred & ~ndi.binary_erosion(pred, border_value=1)
    true_edge = true & ~ndi.binary_erosion(true, border_value=1)
    if not pred_edge.any() and not true_edge.any():
      scores.append(1.0)
      continue
    if not pred_edge.any() or not true_edge.any():
      scores.append(0.0)
      continue
    precision = np.mean(ndi.distance_transform_edt(~true_edge)[pred_edge] <= radius)
    recall = np.mean(ndi.distance_transform_edt(~pred_edge)[true_edge] <= radius)
    total = precision + recall
    scores.append(2 * precision * recall / total if total else 0.0)
  return np.array(scores)


@pytest.mark.parametrize("size", [32, 200])
def test_boundary_f_score_matches_distance_transform(size):
  rng = np.random.default_rng(size)
  true = np.zeros((8, size, size))
  for i in range(8):
    top, left = rng.integers(0, size // 2, 2)
    height, width = rng.integers(3, size // 2, 2)
    true[i, top:top + height, left:left + width] = 1
  pred = np.stack([ndi.shift(t, rng.integers(-3, 4, 2), order=0) for t in true])
  pred = np.where(rng.random(pred.shape) < 0.02, 1 - pred, pred)  # Speckle: stray edges.
  pred[6], true[7] = 0, 0  # Only one of the two has an object.
  pred[5] = true[5]
  radius = metrics.boundary_tolerance(size, size)
  assert radius == {32: 1, 200: 3}[size]  # ceil(0.008 × diagonal).
  scores = metrics.boundary_f_score(pred[..., None], true[..., None])
  np.testing.assert_allclose(scores, reference_boundary_f(pred, true, radius), rtol=1e-12)
  assert scores[5] == 1 and scores[6] == 0 and scores[7] == 0
  assert metrics.boundary_f_score(np.zeros((1, 8, 8)), np.zeros((1, 8, 8))) == [1.0]


def test_boundary_f_score_by_hand():
  true = np.zeros((1, 32, 32))
  true[0, 8:16, 8:16] = 1  # Boundary: the 28 pixels of the square's outer ring.
  assert metrics.mask_boundary(true[0] > 0).sum() == 28
  one_right, two_right = np.roll(true, 1, axis=2), np.roll(true, 2, axis=2)
  assert metrics.boundary_f_score(one_right, true) == [1.0]  # Within the 1-pixel tolerance.
  # Two pixels off, of the 28 predicted edge pixels: the far column (8) is 2 away from any true
  # edge, and so are the middle 4 of the near column, inside the square; the other 16 match.
  # The same count holds the other way round, so P = R = F = 16 / 28.
  np.testing.assert_allclose(metrics.boundary_f_score(two_right, true), [16 / 28])
  frame = np.ones((1, 32, 32))  # Filling the frame: no edge in either, a perfect score.
  assert metrics.boundary_f_score(frame, frame) == [1.0]


def read_json(path):
  with open(path) as f:
    return json.load(f)


def test_evaluate_reproduces_final_metrics_and_writes_everything(trained, tmp_path, capsys):
  _, workdir, final_metrics = trained
  output = tmp_path / "out" / "eval.json"
  evaluate.main([f"--workdir={workdir}", f"--output={output}"])
  saved = read_json(output)
  assert saved["step"] == 6 and saved["split"] == "test" and saved["num_examples"] == 8
  assert saved["data"] == "synthetic" and saved["rank_by"] == "combined"
  assert saved["workdir"] == os.path.abspath(workdir)

  values = saved["metrics"]
  new_keys = {"mask_boundary_f", "baseline_mask_boundary_f"}
  assert set(values) == set(final_metrics) | new_keys
  assert set(final_metrics) == (set(metrics.EvalMetrics.__annotations__)
                                | {"baseline_" + k for k in metrics.EvalMetrics.__annotations__})
  # The same checkpoint, data and baselines as the training run's final evaluation.
  for key, value in final_metrics.items():
    assert values[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
  for key in new_keys:
    assert 0 <= values[key] <= 1

  worst, best = saved["worst"], saved["best"]
  assert len(worst) == len(best) == 4
  assert sorted(e["index"] for e in worst + best) == list(range(8))
  assert min(e["error"] for e in worst) >= max(e["error"] for e in best)
  assert [e["error"] for e in worst] == sorted((e["error"] for e in worst), reverse=True)

  with Image.open(tmp_path / "out" / "eval_examples.png") as sheet:
    # Two blocks of 4 rows of 32-px images enlarged ×3, each under a 16-px title.
    assert sheet.mode == "RGB" and sheet.height == 2 * (16 + 3 * (4 * 34 - 2))
  events = b"".join(open(p, "rb").read() for p in glob.glob(f"{workdir}/events.out.tfevents.*"))
  assert b"evaluate/test/mask_boundary_f" in events and b"evaluate/test/examples" in events

  table = capsys.readouterr().out
  rows = [line.split()[0] for line in table.splitlines()]
  assert rows[rows.index("mask_iou_per_image") + 1] == "mask_boundary_f"
  assert "depth_rmse_log_aligned" in rows and not any(r.startswith("baseline_") for r in rows)
  assert str(output) in table


def test_named_step_and_default_output(trained):
  _, workdir, _ = trained
  evaluate.main([f"--workdir={workdir}", "--step=4", "--num_kept=0", "--num_examples=4"])
  saved = read_json(os.path.join(workdir, "eval_test_4.json"))
  assert saved["step"] == 4 and saved["num_examples"] == 4
  assert "worst" not in saved and not os.path.exists(os.path.join(workdir,
                                                                  "eval_test_4_examples.png"))


def test_evaluate_on_the_original_layout(trained, tmp_path):
  _, workdir, _ = trained
  root = write_folders(tmp_path / "cats", layout_files())
  output = tmp_path / "seed.json"
  evaluate.main([f"--workdir={workdir}", f"--data_dir={root}",
                 f"--tfds_dir={tmp_path / 'tfds'}", f"--output={output}", "--num_kept=1",
                 "--rank_by=mask_boundary_f"])
  saved = read_json(output)
  assert saved["data"] == "original" and saved["data_dir"] == root
  assert saved["num_examples"] == 3  # Of the 12 composites, those whose name's hash says test.
  assert all(np.isfinite(v) for v in saved["metrics"].values())
  change = saved["data_change"]  # Not the run's synthetic scenes, as asked.
  assert change["trained_on"].startswith("dmjax_synthetic/") and change["new"] is None
  assert change["evaluated"] == saved["dataset"] and saved["dataset"].startswith("dmjax_seed/")


@pytest.mark.parametrize("args, message", [
    (["--step=3"], r"no checkpoint of step 3; have \[2, 4, 6\]"),
    (["--split=validation"], "has no split 'validation'"),
])
def test_bad_requests_are_one_line_errors(trained, args, message):
  _, workdir, _ = trained
  with pytest.raises(SystemExit, match=f"^error: .*{message}"):
    evaluate.main([f"--workdir={workdir}", *args])


def test_workdir_without_checkpoints_is_refused(tmp_path):
  with pytest.raises(SystemExit, match=f"^error: {tmp_path}/checkpoints: no checkpoints here"):
    evaluate.main([f"--workdir={tmp_path}"])


def _mask_iou_on_test_scenes(predictor, size, num_examples):
  from dmjax.data import synthetic

  overlap = union = 0
  for index in range(num_examples):
    scene = synthetic.render_example("test", index, resolution=size)
    mask, _ = predictor(scene["bg"], scene["fg_bg"])
    assert mask.shape == (size, size)  # Scored at the scene's own size.
    truth, predicted = scene["mask"][..., 0] >= 128, mask > 0.5
    overlap += (truth & predicted).sum()
    union += (truth | predicted).sum()
  return overlap / union


def test_resolutions_score_scenes_rendered_at_each_size(trained, tmp_path, capsys):
  _, workdir, _ = trained
  output = tmp_path / "sizes.json"
  evaluate.main([f"--workdir={workdir}", "--resolution=32,48", "--num_examples=2",
                 f"--output={output}"])
  assert "48" in capsys.readouterr().out
  saved = json.loads(output.read_text())["metrics"]
  predictor = inference.Predictor.from_workdir(workdir)
  for size in (32, 48):
    assert saved[str(size)]["mask_iou"] == pytest.approx(
        _mask_iou_on_test_scenes(predictor, size, 2), abs=1e-6)
    assert 0 <= saved[str(size)]["mask_boundary_f"] <= 1


def test_resolutions_without_mask_cleanup_keep_a_file_of_their_own(trained, tmp_path):
  workdir = str(tmp_path / "run")
  shutil.copytree(trained[1], workdir)  # The shared run stays as it was.
  evaluate.main([f"--workdir={workdir}", "--resolution=32", "--num_examples=2",
                 "--noclean_mask"])
  raw = inference.Predictor.from_workdir(workdir, clean_mask=False)
  with open(os.path.join(workdir, f"eval_resolutions_32_auto_uncleaned_{raw.step}.json")) as f:
    saved = json.load(f)
  assert saved["clean_mask"] is False
  assert saved["metrics"]["32"]["mask_iou"] == pytest.approx(
      _mask_iou_on_test_scenes(raw, 32, 2), abs=1e-6)


def test_bad_resolutions_are_one_line_errors(trained):
  _, workdir, _ = trained
  with pytest.raises(SystemExit, match="--resolution='192,big'"):
    evaluate.main([f"--workdir={workdir}", "--resolution=192,big"])


def test_evaluation_places_the_parameters_on_the_mesh_once():
  import jax

  from dmjax import parallel
  from dmjax.evaluation import evaluator

  mesh = parallel.create_mesh()
  variables = {"params": {"scale": np.full((1,), 0.5, np.float32)}}  # As a checkpoint gives them.
  received = []

  @jax.jit
  def scaled_metrics(variables, batch):
    return metrics.compute_metrics(batch["mask"] * variables["params"]["scale"][0],
                                   batch["depth"], batch)

  def step(variables, batch):
    received.append(variables)
    return scaled_metrics(variables, batch)

  rng = np.random.default_rng(0)
  batches = [{"mask": rng.random((2, 8, 8, 1), np.float32),
              "depth": rng.random((2, 8, 8, 1), np.float32),
              "example_weight": np.ones(2, np.float32)} for _ in range(3)]
  evaluator.evaluate(step, variables, batches, mesh)
  assert len(received) == 3
  leaves = [leaf for placed in received for leaf in jax.tree.leaves(placed)]
  assert all(isinstance(leaf, jax.Array) and leaf.sharding == parallel.replicated(mesh)
             for leaf in leaves), leaves
  assert all(placed is received[0] for placed in received)  # Placed once, not per batch.


def original_layout_run(untrained_workdir, root, tfds_dir, workdir):
  """A run on the original layout at `root`, saved as training saves it (the untrained tiny
  model, its config, the training stream's state), at step 1; returns its config."""
  from dmjax.data import pipeline

  saved_config, variables, _ = checkpoints.restore_model(untrained_workdir)
  config = saved_config.copy_and_resolve_references()
  config.data.update(source="original", dir=str(root), tfds_dir=str(tfds_dir))
  pipeline.prepare(config)
  manager = checkpoints.create_manager(str(workdir), async_save=False)
  checkpoints.save(manager, 1, model=variables, config=config,
                   data_iterator=pipeline.create_train_iterator(config), force=True)
  manager.close()
  return config


def test_evaluate_says_which_composites_are_new_since_the_run_trained(
    untrained_workdir, tmp_path, capsys):
  root = write_folders(tmp_path / "cats", layout_files())
  workdir = tmp_path / "run"
  original_layout_run(untrained_workdir, root, tmp_path / "tfds", workdir)
  new = add_composites(root, fg=3)  # Photos added after training.
  output = tmp_path / "eval.json"
  evaluate.main([f"--workdir={workdir}", f"--output={output}", "--num_kept=0"])
  change = read_json(output)["data_change"]
  assert change["new"] == sorted(new) and change["gone"] == 0
  assert set(change["new_in_split"]) < set(new) and change["new_in_split"]
  assert change["trained_in_split"] == 0  # No training composite of the run is a test one now.
  assert read_json(output)["num_examples"] == 3 + len(change["new_in_split"])
  notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("Note:")]
  assert len(notes) == 1
  assert (f"6 composite(s) new, {len(change['new_in_split'])} of them in the test split "
          f"({change['new_in_split'][0]}") in notes[0]
  assert notes[0].endswith("none of the test split's composites was a training composite of "
                           "the run.")


def test_a_run_split_before_splits_by_name_is_evaluated_on_its_own_built_data(
    untrained_workdir, tmp_path, capsys):
  # A run of before: its checkpoint names a dataset without the `k` of those named by their
  # composites, built then (here: today's build, moved to that name, without the composite
  # lists, which such builds lack).
  root = write_folders(tmp_path / "cats", layout_files())
  workdir, tfds_dir = tmp_path / "run", tmp_path / "tfds"
  config = original_layout_run(untrained_workdir, root, tfds_dir, workdir)
  from dmjax.data import sources

  built = sources.get_source(config).builder.data_dir
  legacy = "image_t30_s0_0123456789"
  shutil.move(os.path.dirname(built), tfds_dir / "dmjax_seed" / legacy)
  os.remove(tfds_dir / "dmjax_seed" / legacy / os.path.basename(built) / "metadata.json")
  (state_file,) = glob.glob(f"{workdir}/checkpoints/1/data/process_0-of-1.json")
  state = read_json(state_file)
  state["dataset"] = f"dmjax_seed/{legacy}"
  with open(state_file, "w") as f:
    json.dump(state, f)
  add_composites(root, fg=3)  # Today's folder would be split another way.

  output = tmp_path / "eval.json"
  evaluate.main([f"--workdir={workdir}", f"--output={output}", "--num_kept=0"])
  saved = read_json(output)
  assert saved["dataset"] == f"dmjax_seed/{legacy}" and saved["num_examples"] == 3
  assert "data_change" not in saved
  assert f"Note: evaluating dmjax_seed/{legacy}, the data this run trained on" in (
      capsys.readouterr().out)
  # Without that build, the folder as it is now is refused in one line.
  shutil.rmtree(tfds_dir / "dmjax_seed" / legacy)
  with pytest.raises(SystemExit, match=f"^error: this run trained on dmjax_seed/{legacy}, whose "
                     "split was drawn before splits were drawn by name, and it is not built in "):
    evaluate.main([f"--workdir={workdir}", f"--output={output}", "--num_kept=0"])
