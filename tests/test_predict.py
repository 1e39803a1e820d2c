"""The predictor API and the predict tool on files and folders, and its refusals of bad input."""

import functools
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import HIDE_TENSORFLOW, read_png, run_command
from PIL import Image

from dmjax import inference, predict
from dmjax.data import pipeline, schema
from dmjax.evaluation import evaluator
from dmjax.inference import outputs as outputs_lib
from dmjax.inference import photos
from dmjax.inference import predictor as predictor_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEIGHT, WIDTH = 37, 50  # Neither divisible by 16.


@pytest.fixture(scope="module")
def workdir(untrained_workdir):
  return untrained_workdir


@pytest.fixture(scope="module")
def predictor(workdir):
  return inference.Predictor.from_workdir(workdir)


def scene(seed, height=HEIGHT, width=WIDTH):
  return photos.demo_pair(height, width, seed)


def save(path, array, mode=None):
  image = Image.fromarray(array)
  image = image.convert(mode) if mode else image
  image.save(path, quality=95) if str(path).endswith(".jpg") else image.save(path)
  return str(path)


run_main = functools.partial(run_command, predict.main)


def snapshot(folder):
  if not os.path.isdir(folder):
    return {}
  return {name: open(os.path.join(folder, name), "rb").read() for name in os.listdir(folder)}


def test_resize_mode_matches_the_evaluation_pipeline(workdir, tiny_data_config):
  predictor = inference.Predictor.from_workdir(workdir, fit="resize")
  # 50 × 37, not the run's 32 × 32 (nor square): the pair goes in resized as evaluation resizes
  # it, and the outputs come back bilinearly resized to 50 × 37.
  bg, fg_bg = scene(0)
  example = {"bg": bg, "fg_bg": fg_bg, "mask": np.zeros((HEIGHT, WIDTH, 1), np.uint8),
             "depth": np.zeros((HEIGHT, WIDTH, 1), np.uint16)}
  prepared = pipeline.prepare_eval_example(example, tiny_data_config.data.resolution,
                                          tiny_data_config.data.binarize_mask)
  batch = {k: v[None] for k, v in prepared.items()}
  assert batch["fg_bg"].shape == (1, 32, 32, 3)
  mask, depth = jax.device_get(evaluator.predict(predictor.model, predictor.variables, batch))

  def back_to_input_size(values):
    resized = Image.fromarray(np.float32(values[0, ..., 0])).resize(
        (WIDTH, HEIGHT), Image.Resampling.BILINEAR)
    return np.clip(np.asarray(resized), 0, 1)

  got = predictor(bg, fg_bg)
  assert got.mask.shape == got.depth.shape == (HEIGHT, WIDTH)
  assert got.mask.std() > 0 and got.depth.std() > 0  # Not a constant map: the test can fail.
  np.testing.assert_allclose(got.mask, back_to_input_size(mask), atol=1e-5)
  np.testing.assert_allclose(got.depth, back_to_input_size(depth), atol=1e-5)


def test_api_takes_any_size_dtype_channels_and_batches(predictor):
  bg, fg_bg = scene(1)
  mask, depth = predictor(bg, fg_bg)
  assert mask.shape == depth.shape == (HEIGHT, WIDTH) and mask.dtype == np.float32
  assert 0 <= mask.min() and mask.max() <= 1 and 0 <= depth.min() and depth.max() <= 1
  as_float = predictor(bg / 255.0, fg_bg.astype(np.float32) / 255)
  np.testing.assert_allclose(as_float.mask, mask, atol=1e-6)
  rgba = np.concatenate([fg_bg, np.full((HEIGHT, WIDTH, 1), 255, np.uint8)], axis=-1)
  np.testing.assert_allclose(predictor(bg, rgba).depth, depth, atol=1e-6)
  gray = predictor(bg[..., 0], fg_bg[..., :1])
  assert gray.mask.shape == (HEIGHT, WIDTH)

  other_bg, other_fg_bg = scene(2)
  batch = predictor(np.stack([bg, other_bg]), np.stack([fg_bg, other_fg_bg]))
  assert batch.mask.shape == (2, HEIGHT, WIDTH)
  np.testing.assert_allclose(batch.mask[0], mask, atol=1e-6)
  np.testing.assert_allclose(batch.depth[1], predictor(other_bg, other_fg_bg).depth, atol=1e-6)

  mixed = predictor.predict_pairs([(bg, fg_bg), scene(3, 20, 70)])
  assert mixed[1].mask.shape == (20, 70)
  with pytest.raises(ValueError, match="pair 0: bg is 50×37 but fg_bg is 49×37"):
    predictor(bg, fg_bg[:, :-1])
  with pytest.raises(ValueError, match="expected uint8 or float"):
    predictor(bg.astype(np.int64), fg_bg)


def test_pad_mode_runs_at_the_images_own_size(workdir):
  padded = inference.Predictor.from_workdir(workdir, fit="pad", batch_size=2)
  bg, fg_bg = scene(4)
  mask, depth = padded(bg, fg_bg)
  assert mask.shape == (HEIGHT, WIDTH)
  # The model at 48 × 64 (the next multiples of 16) on edge-padded inputs, cropped back.
  inputs = {k: schema.normalize_photo(predictor_lib._pad_to_multiple(x, 16), k)[None]
            for k, x in (("bg", bg), ("fg_bg", fg_bg))}
  full = evaluator.predict(padded.model, padded.variables, inputs)
  np.testing.assert_allclose(mask, np.asarray(full[0])[0, :HEIGHT, :WIDTH, 0], atol=1e-5)


def test_one_pair_of_files_writes_every_output(workdir, predictor, tmp_path):
  bg, fg_bg = scene(5)
  rgba = np.concatenate([fg_bg, np.full((HEIGHT, WIDTH, 1), 255, np.uint8)], axis=-1)
  bg_path, fg_bg_path = save(tmp_path / "bg.jpg", bg), save(tmp_path / "shot.png", rgba)
  out = tmp_path / "out"
  assert run_main(f"--workdir={workdir}", f"--bg={bg_path}", f"--fg_bg={fg_bg_path}",
                  f"--out={out}", "--overlay") is None
  assert sorted(os.listdir(out)) == ["shot_depth.png", "shot_depth_color.png", "shot_mask.png",
                                     "shot_overlay.png"]
  expected = predictor(inference.read_image(bg_path), inference.read_image(fg_bg_path))
  mode, mask = read_png(out / "shot_mask.png")
  assert mode == "L" and mask.shape == (HEIGHT, WIDTH)
  np.testing.assert_array_equal(mask, np.round(expected.mask * 255))
  mode, depth = read_png(out / "shot_depth.png")
  assert mode.startswith("I") and depth.shape == (HEIGHT, WIDTH)  # 16-bit.
  np.testing.assert_allclose(depth, np.round(expected.depth * 65535), atol=1)
  assert read_png(out / "shot_depth_color.png")[1].shape == (HEIGHT, WIDTH, 3)
  assert read_png(out / "shot_overlay.png")[1].shape == (HEIGHT, 4 * WIDTH + 3 * 4, 3)


def test_folders_pair_by_name_and_skip_bad_pairs(workdir, tmp_path, capsys):
  bg_dir, fg_bg_dir, out = tmp_path / "bg", tmp_path / "fg_bg", tmp_path / "out"
  bg_dir.mkdir()
  fg_bg_dir.mkdir()
  for name, seed in (("a", 6), ("b", 7), ("c", 8), ("e", 9)):
    bg, fg_bg = scene(seed)
    save(bg_dir / f"{name}.jpg", bg, mode="L" if name == "b" else None)
    save(fg_bg_dir / f"{name}.png", fg_bg, mode="RGBA" if name == "a" else None)
  save(fg_bg_dir / "b.png", scene(7)[1], mode="L")  # Grayscale, beside a grayscale bg.
  save(fg_bg_dir / "c.png", scene(8, HEIGHT + 1)[1])  # Another size than its background.
  save(fg_bg_dir / "d.jpg", scene(10)[1])  # No partner.
  (fg_bg_dir / "e.png").write_bytes(b"not a picture")
  (fg_bg_dir / "notes.txt").write_text("not an image name: ignored")

  message = run_main(f"--workdir={workdir}", f"--bg_dir={bg_dir}", f"--fg_bg_dir={fg_bg_dir}",
                     f"--out={out}", "--batch_size=2")
  assert message == f"error: 3 of 5 composites failed (see above); the others are in {out}"
  assert sorted(os.listdir(out)) == ["a_depth.png", "a_depth_color.png", "a_mask.png",
                                     "b_depth.png", "b_depth_color.png", "b_mask.png"]
  assert read_png(out / "b_mask.png")[1].shape == (HEIGHT, WIDTH)
  lines = capsys.readouterr().err.splitlines()
  errors = [line for line in lines if line.startswith("error:")]
  assert errors[:2] == [
      f"error: {fg_bg_dir}/d.jpg: no background named d.* in {bg_dir}",
      f"error: {fg_bg_dir}/c.png: is 50×38 but its background {bg_dir}/c.jpg is 50×37; a pair "
      "must be the same size",
  ]
  assert len(errors) == 3
  assert errors[2].startswith(f"error: {fg_bg_dir}/e.png: cannot read it as an image (")
  assert "predict: 5 composites: 2 written, 0 skipped (their outputs exist), 3 failed" in lines


def test_one_background_for_a_folder_of_composites(workdir, tmp_path, capsys):
  bg, _ = scene(11)
  fg_bg_dir, out = tmp_path / "shots", tmp_path / "out"
  fg_bg_dir.mkdir()
  for index in range(3):
    composite = bg.copy()
    composite[5 * index:5 * index + 9, 10:20] = 255
    save(fg_bg_dir / f"shot{index}.jpg", composite)
  assert run_main(f"--workdir={workdir}", f"--bg={save(tmp_path / 'bg.png', bg)}",
                  f"--fg_bg_dir={fg_bg_dir}", f"--out={out}", "--batch_size=2") is None
  assert len(os.listdir(out)) == 9
  assert "predict: 3/3 composites" in capsys.readouterr().err


def test_existing_outputs_are_kept_unless_overwrite(workdir, tmp_path):
  bg, fg_bg = scene(12)
  bg_path, fg_bg_path = save(tmp_path / "bg.jpg", bg), save(tmp_path / "x.jpg", fg_bg)
  out = tmp_path / "out"
  out.mkdir()
  (out / "x_depth.png").write_bytes(b"keep me")
  args = [f"--workdir={workdir}", f"--bg={bg_path}", f"--fg_bg={fg_bg_path}", f"--out={out}"]
  assert run_main(*args) == (f"error: {out}/x_depth.png: exists; pass --overwrite to replace "
                             "it")
  assert snapshot(out) == {"x_depth.png": b"keep me"}  # Nothing else written either.
  assert run_main(*args, "--overwrite") is None
  assert read_png(out / "x_depth.png")[1].shape == (HEIGHT, WIDTH)
  assert not [name for name in os.listdir(out) if name.endswith(".tmp")]


@pytest.mark.parametrize("problem", ["unreadable", "missing file", "sizes differ",
                                     "no partner", "empty folder", "no checkpoints",
                                     "both --bg and --bg_dir"])
def test_bad_input_is_a_one_line_error(problem, workdir, tmp_path, capsys):
  bg, fg_bg = scene(13)
  bg_path, fg_bg_path = save(tmp_path / "bg.png", bg), save(tmp_path / "fg.jpg", fg_bg)
  folder = tmp_path / "folder"
  folder.mkdir()
  out = tmp_path / "out"
  out.mkdir()
  (out / "fg_mask.png").write_bytes(b"an earlier result")  # Kept whatever happens.
  args = {"workdir": workdir, "bg": bg_path, "fg_bg": fg_bg_path, "out": out, "overwrite": ""}
  if problem == "unreadable":
    (tmp_path / "fg.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    expected = f"{fg_bg_path}: cannot read it as an image"
  elif problem == "missing file":
    args["bg"] = expected_path = str(tmp_path / "nope.jpg")
    expected = f"{expected_path}: no such file"
  elif problem == "sizes differ":
    save(bg_path, scene(13, HEIGHT, WIDTH + 3)[0])
    expected = f"{fg_bg_path}: is 50×37 but its background {bg_path} is 53×37"
  elif problem == "no partner":
    del args["bg"], args["fg_bg"]
    args.update(bg_dir=folder, fg_bg_dir=tmp_path / "shots")
    (tmp_path / "shots").mkdir()
    save(tmp_path / "shots" / "fg.jpg", fg_bg)
    save(folder / "other.jpg", bg)
    expected = f"{tmp_path}/shots/fg.jpg: no background named fg.* in {folder}"
  elif problem == "empty folder":
    del args["fg_bg"]
    args["fg_bg_dir"] = folder
    (folder / "readme.txt").write_text("no images here")
    expected = f"{folder}: no images in this folder"
  elif problem == "no checkpoints":
    args["workdir"] = folder
    expected = f"{folder}/checkpoints: no checkpoints here"
  else:
    args["bg_dir"] = folder
    expected = "give exactly one of --bg (one background) and --bg_dir (a folder)"
  message = run_main(*(f"--{k}={v}" if v != "" else f"--{k}" for k, v in args.items()))
  assert "\n" not in message
  if problem == "no partner":  # Folder mode: each bad pair on its own line, then a summary.
    lines = capsys.readouterr().err.splitlines()
    assert [line for line in lines if not line.startswith(("JAX ", "predict: "))] == [
        f"error: {expected}"]
    assert message.startswith("error: 1 of 1 composites failed")
  else:
    assert message.startswith(f"error: {expected}")
  assert snapshot(out) == {"fg_mask.png": b"an earlier result"}


_PREDICT_WITHOUT_TF = HIDE_TENSORFLOW + """
import runpy
sys.argv = ["dmjax.predict", *sys.argv[1:]]
runpy.run_module("dmjax.predict", run_name="__main__")
assert "tensorflow" not in sys.modules and "tensorflow_datasets" not in sys.modules
"""


@pytest.mark.slow
def test_command_line_runs_without_tensorflow(workdir, tmp_path):
  bg, fg_bg = scene(14)
  args = [f"--workdir={workdir}", f"--bg={save(tmp_path / 'bg.jpg', bg)}",
          f"--fg_bg={save(tmp_path / 'fg.png', fg_bg)}", f"--out={tmp_path / 'out'}"]
  result = subprocess.run([sys.executable, "-c", _PREDICT_WITHOUT_TF, *args], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert len(os.listdir(tmp_path / "out")) == 3
  result = subprocess.run([sys.executable, "-m", "dmjax.predict", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 1
  assert result.stderr.strip().splitlines()[-1] == (
      f"error: {tmp_path}/out/fg_mask.png: exists; pass --overwrite to replace it")


# ---- Many photo sizes: the model runs at a few shapes, compiled once.


def test_after_warm_up_photos_of_new_sizes_compile_nothing(workdir):
  from dmjax.inference import compilations

  predictor = inference.Predictor.from_workdir(workdir, batch_size=2)
  shapes = predictor.model_input_shapes()
  warm = predictor.warm_up()
  assert warm.shapes == len(shapes) and warm.seconds > 0
  before = compilations.count()
  sizes = [(37, 50), (20, 70), (64, 33), (101, 90), (13, 200), (240, 31), (48, 48)]
  for height, width in sizes:
    mask, depth = predictor(*scene(len(sizes), height, width))
    assert mask.shape == depth.shape == (height, width)
  # Pairs of several sizes in one call: those that share a working shape share a batch.
  predictor.predict_pairs([scene(1, 30, 40), scene(2, 45, 60), scene(3, 70, 20)])
  assert compilations.count() == before, "a photo of a new size compiled a program"
  assert set(predictor.calls) <= set(shapes)


def test_pad_fit_shares_programs_between_nearby_sizes_and_runs_no_copies(workdir):
  from dmjax.inference import compilations

  padded = inference.Predictor.from_workdir(workdir, fit="pad", batch_size=8)
  padded(*scene(0, 37, 50))
  before = compilations.count()
  for height, width in ((40, 60), (45, 57), (33, 64)):  # All pad to 48 × 64.
    padded(*scene(1, height, width))
  assert compilations.count() == before
  # One pair is one pair in the call, not batch_size copies of it.
  assert padded.calls == {(1, 48, 64): 4}
  assert padded.model_input_shapes([(40, 60)]) == [(b, 48, 64) for b in (1, 2, 4, 8)]


def test_batches_are_split_by_pixels_and_powers_of_two(workdir):
  padded = inference.Predictor.from_workdir(workdir, fit="pad", batch_size=8,
                                            max_batch_pixels=3 * HEIGHT * WIDTH)
  pairs = [scene(seed) for seed in range(7)]
  predictions = padded.predict_pairs(pairs)
  # 3 pairs' pixels a call: 3 + 3 + 1 pairs, each 3 run as 2 + 1.
  assert padded.calls == {(2, 48, 64): 2, (1, 48, 64): 3}
  np.testing.assert_allclose(predictions[6].mask, padded(*pairs[6]).mask, atol=1e-6)


def test_a_float_photo_above_one_is_refused_not_clipped(predictor):
  bg, fg_bg = scene(3)
  with pytest.raises(ValueError, match=r"fg_bg 0: float pixels must lie in \[0, 1\], got 7 to "
                     r"250 \(for 0\.\.255 values pass uint8"):
    predictor(bg / 255.0, fg_bg.astype(np.float32))
  with pytest.raises(ValueError, match="got nan to nan"):
    predictor(np.full(bg.shape, np.nan, np.float32), fg_bg)


@pytest.mark.slow
def test_a_second_start_compiles_nothing_from_the_compilation_cache(workdir, tmp_path):
  """Three fresh processes: with --nocompilation_cache (nothing kept), then twice with the cache
  in the user's cache folder ($XDG_CACHE_HOME/dmjax/jax): the second compiles nothing."""
  bg, fg_bg = scene(5)
  args = [f"--workdir={workdir}", f"--bg={save(tmp_path / 'bg.png', bg)}",
          f"--fg_bg={save(tmp_path / 'fg.png', fg_bg)}", "--overwrite", "--fit=resize"]
  script = ("import sys\nfrom dmjax import predict\nfrom dmjax.inference import compilations\n"
            "predict.main(sys.argv[1:])\nc = compilations.count()\n"
            "print('COUNTS', c.compiled, c.from_cache)\n")
  env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
  env.update(XDG_CACHE_HOME=str(tmp_path / "cache"), JAX_PLATFORMS="cpu")
  cache = tmp_path / "cache" / "dmjax" / "jax"

  def counts(*extra):
    done = subprocess.run([sys.executable, "-c", script, *args, f"--out={tmp_path / 'out'}",
                           *extra], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return tuple(map(int, done.stdout.split("COUNTS")[-1].split()))

  compiled, from_cache = counts("--nocompilation_cache")
  assert compiled > 0 and from_cache == 0 and not cache.exists()
  compiled, from_cache = counts()
  assert compiled > 0 and from_cache == 0 and len(os.listdir(cache)) >= compiled
  compiled, from_cache = counts()
  assert compiled == 0 and from_cache > 0


# ---- Folders: resume, one bad pair alone, the pixel budget, names that collide.


def _folder(tmp_path, names, size=(HEIGHT, WIDTH)):
  bg_dir, fg_bg_dir = tmp_path / "bg", tmp_path / "fg_bg"
  bg_dir.mkdir(exist_ok=True)
  fg_bg_dir.mkdir(exist_ok=True)
  for seed, name in enumerate(names):
    bg, fg_bg = scene(seed, *size)
    save(bg_dir / f"{name}.png", bg)
    save(fg_bg_dir / f"{name}.png", fg_bg)
  return bg_dir, fg_bg_dir


def test_a_folder_run_resumes_where_it_stopped(workdir, tmp_path, capsys):
  bg_dir, fg_bg_dir = _folder(tmp_path, ["a", "b", "c"])
  out = tmp_path / "out"
  args = [f"--workdir={workdir}", f"--bg_dir={bg_dir}", f"--fg_bg_dir={fg_bg_dir}",
          f"--out={out}", "--batch_size=2"]
  assert run_main(*args) is None
  (out / "b_depth.png").unlink()  # As if stopped between two of b's files,
  for kind in ("mask", "depth", "depth_color"):  # and before c.
    (out / f"c_{kind}.png").unlink()
  kept = {name: (os.stat(out / name).st_mtime_ns, (out / name).read_bytes())
          for name in os.listdir(out)}
  capsys.readouterr()
  assert run_main(*args) is None
  assert "predict: 3 composites: 2 written, 1 skipped (their outputs exist), 0 failed" in (
      capsys.readouterr().err.splitlines())
  assert len(os.listdir(out)) == 9
  for name, (mtime, data) in kept.items():  # What existed is left alone.
    assert (os.stat(out / name).st_mtime_ns, (out / name).read_bytes()) == (mtime, data), name
  message = run_main(*args, "--noskip_existing")
  assert message == f"error: 3 of 3 composites failed (see above); the others are in {out}"


def test_a_pair_that_fails_in_a_batch_is_retried_alone(predictor, tmp_path, monkeypatch):
  bg_dir, fg_bg_dir = _folder(tmp_path, ["a", "b", "c", "d"])
  save(bg_dir / "c.png", scene(2, 60, 80)[0])
  save(fg_bg_dir / "c.png", scene(2, 60, 80)[1])
  real = predictor.predict_pairs
  calls = []

  def out_of_memory_on_large_pairs(pairs):
    calls.append(len(pairs))
    if any(bg.shape[0] > HEIGHT for bg, _ in pairs):
      raise MemoryError("a 60×80 pair is too large for this test")
    return real(pairs)

  monkeypatch.setattr(predictor, "predict_pairs", out_of_memory_on_large_pairs)
  jobs, problems = photos.find_jobs(bg=None, fg_bg=None, bg_dir=str(bg_dir),
                                    fg_bg_dir=str(fg_bg_dir))
  assert not problems
  reports = []
  summary = photos.predict_jobs(predictor, jobs, str(tmp_path / "out"), report=reports.append)
  assert (summary.written, summary.skipped, summary.failed) == (3, 0, 1)
  assert reports == [f"{fg_bg_dir}/c.png: prediction failed (MemoryError: a 60×80 pair is too "
                     "large for this test)"]
  assert calls == [4, 1, 1, 1, 1]  # The batch, then pair by pair.
  assert sorted(os.listdir(tmp_path / "out"))[:3] == ["a_depth.png", "a_depth_color.png",
                                                      "a_mask.png"]


def test_a_folder_is_read_a_pixel_budget_at_a_time(predictor, tmp_path, monkeypatch):
  _, fg_bg_dir = _folder(tmp_path, ["a", "b", "c", "d", "e"])
  limited = predictor_lib.Predictor(model=predictor.model, variables=predictor.variables,
                                    resolution=predictor.resolution, batch_size=8,
                                    max_batch_pixels=2 * HEIGHT * WIDTH)
  loaded = []
  real = limited.predict_pairs
  monkeypatch.setattr(limited, "predict_pairs", lambda pairs: (loaded.append(len(pairs)),
                                                               real(pairs))[1])
  bg_path = save(tmp_path / "one_bg.png", scene(0)[0])
  jobs, _ = photos.find_jobs(bg=bg_path, fg_bg=None, bg_dir=None, fg_bg_dir=str(fg_bg_dir))
  summary = photos.predict_jobs(limited, jobs, str(tmp_path / "out"), report=pytest.fail)
  assert summary.written == 5 and loaded == [2, 2, 1]  # Not all 5 at once: 2 pairs' pixels.


def test_composite_names_that_differ_only_in_case_collide_and_only_photos_count(tmp_path):
  fg_bg_dir = tmp_path / "fg_bg"
  fg_bg_dir.mkdir()
  save(fg_bg_dir / "Cat.png", scene(0)[1])
  save(fg_bg_dir / "cat.jpg", scene(1)[1])
  save(fg_bg_dir / "dog.png", scene(2)[1])
  (fg_bg_dir / "dog.eps").write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n")  # Not a photo: not listed.
  jobs, problems = photos.find_jobs(bg=str(fg_bg_dir / "dog.png"), fg_bg=None, bg_dir=None,
                                    fg_bg_dir=str(fg_bg_dir))
  assert [job.name for job in jobs] == ["dog"]
  assert problems == [
      f"{fg_bg_dir}/Cat.png: another composite has the same name, letter case aside (cat.jpg); "
      "their outputs would collide",
      f"{fg_bg_dir}/cat.jpg: another composite has the same name, letter case aside (Cat.png); "
      "their outputs would collide"]


# ---- The outputs people expect: a cut-out, a new background.


def test_cutout_and_replaced_background(workdir, predictor, tmp_path):
  bg, fg_bg = scene(7)
  rows = np.linspace(0, 255, 30, dtype=np.uint8)
  beach = np.stack(np.broadcast_arrays(rows[:, None], np.full((30, 90), 90, np.uint8),
                                       np.uint8(200)), axis=-1)  # Wider than the composite.
  args = [f"--workdir={workdir}", f"--bg={save(tmp_path / 'bg.png', bg)}",
          f"--fg_bg={save(tmp_path / 'shot.png', fg_bg)}", f"--out={tmp_path / 'out'}"]
  assert run_main(*args, "--cutout", f"--replace_bg={save(tmp_path / 'beach.png', beach)}") is None
  out = tmp_path / "out"
  assert sorted(os.listdir(out)) == ["shot_cutout.png", "shot_depth.png", "shot_depth_color.png",
                                     "shot_mask.png", "shot_replace_bg.png"]
  expected = predictor(bg, fg_bg).mask
  mode, cutout = read_png(out / "shot_cutout.png")
  assert mode == "RGBA" and cutout.shape == (HEIGHT, WIDTH, 4)
  np.testing.assert_array_equal(cutout[..., :3], fg_bg)
  np.testing.assert_array_equal(cutout[..., 3], np.round(expected * 255))
  assert 0 < cutout[..., 3].min() < cutout[..., 3].max() < 255  # Soft, not thresholded.
  mode, replaced = read_png(out / "shot_replace_bg.png")
  assert mode == "RGB" and replaced.shape == (HEIGHT, WIDTH, 3)
  # By hand at one pixel: 30 × 90 covers 37 × 50 at scale 37/30; its middle columns kept.
  fitted = outputs_lib.fit_cover(beach, HEIGHT, WIDTH)
  np.testing.assert_array_equal(fitted[..., 1], 90)
  y, x = 20, 10
  want = expected[y, x] * fg_bg[y, x] + (1 - expected[y, x]) * fitted[y, x].astype(np.float64)
  np.testing.assert_allclose(replaced[y, x], want, atol=0.51)
  np.testing.assert_array_equal(replaced, outputs_lib.replace_background(fg_bg, expected, beach))
  assert run_main(*args, "--overwrite", f"--replace_bg={tmp_path / 'nope.jpg'}") == (
      f"error: {tmp_path / 'nope.jpg'}: no such file")


# ---- Photos as files: values, not only shapes.


def test_exif_orientation_is_applied(tmp_path):
  # Stored 20 high × 30 wide, a bright block at the top left; orientation 6 says "turn 90°
  # clockwise to show": 30 high × 20 wide, the block at the top right.
  stored = np.full((20, 30, 3), 40, np.uint8)
  stored[:8, :8] = (250, 250, 250)
  exif = Image.Exif()
  exif[0x0112] = 6
  Image.fromarray(stored).save(tmp_path / "phone.jpg", quality=95, exif=exif)
  upright = inference.read_image(str(tmp_path / "phone.jpg"))
  assert upright.shape == (30, 20, 3)
  np.testing.assert_allclose(upright, np.rot90(stored, k=-1), atol=12)
  assert upright[:8, -8:].min() > 200 and upright[:8, :8].max() < 80


def test_grayscale_palette_transparent_and_16_bit_images_read_as_these_values(tmp_path):
  gray = np.arange(6 * 7, dtype=np.uint8).reshape(6, 7) * 6
  Image.fromarray(gray).save(tmp_path / "gray.png")
  np.testing.assert_array_equal(inference.read_image(str(tmp_path / "gray.png")),
                                np.repeat(gray[..., None], 3, axis=-1))
  # A palette image: each index's colour, in a PNG and a GIF (whose index 2 is transparent).
  palette = np.array([[255, 0, 0], [0, 128, 255], [10, 20, 30], [200, 200, 0]], np.uint8)
  indices = np.arange(6 * 7).reshape(6, 7) % 4
  for name, extra in (("palette.png", {}), ("palette.gif", {"transparency": 2})):
    image = Image.fromarray(indices.astype(np.uint8), mode="P")
    image.putpalette(palette.ravel().tolist())
    image.save(tmp_path / name, **extra)
    np.testing.assert_array_equal(inference.read_image(str(tmp_path / name)), palette[indices])
  # RGBA: alpha dropped, the colour under a transparent pixel kept (what the camera saw).
  rgba = np.zeros((6, 7, 4), np.uint8)
  rgba[..., :3] = (10, 20, 30)
  rgba[:3, ..., 3] = 255
  rgba[3:, :, :3] = (200, 100, 50)  # Fully transparent, with a colour of its own.
  Image.fromarray(rgba).save(tmp_path / "rgba.png")
  np.testing.assert_array_equal(inference.read_image(str(tmp_path / "rgba.png")), rgba[..., :3])
  # 16-bit grayscale: scaled to 8 bits (× 255 / 65535), not clipped at 255.
  deep = np.array([[0, 257, 32896], [65535, 1000, 65278]], np.uint16)
  Image.fromarray(deep).save(tmp_path / "deep.png")
  np.testing.assert_array_equal(inference.read_image(str(tmp_path / "deep.png"))[..., 0],
                                [[0, 1, 128], [255, 4, 254]])
