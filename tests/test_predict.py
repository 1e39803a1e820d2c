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


def test_reads_16_bit_grayscale_and_palette_images(tmp_path):
  gray = np.linspace(0, 65535, 6 * 7).reshape(6, 7).astype(np.uint16)
  Image.fromarray(gray).save(tmp_path / "deep.png")
  np.testing.assert_array_equal(inference.read_image(str(tmp_path / "deep.png")),
                                np.repeat(np.round(gray / 257.0)[..., None], 3, axis=-1))
  rgb = scene(15, 6, 7)[1]
  Image.fromarray(rgb).convert("P").save(tmp_path / "palette.gif")
  assert inference.read_image(str(tmp_path / "palette.gif")).shape == (6, 7, 3)


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
  errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
  assert errors == [
      f"error: {fg_bg_dir}/d.jpg: no background named d.* in {bg_dir}",
      f"error: {fg_bg_dir}/c.png: is 50×38 but its background {bg_dir}/c.jpg is 50×37; a pair "
      "must be the same size",
      f"error: {fg_bg_dir}/e.png: cannot read it as an image (cannot identify image file "
      f"'{fg_bg_dir}/e.png')",
  ]


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
    assert [line for line in lines if not line.startswith("JAX ")] == [f"error: {expected}"]
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
