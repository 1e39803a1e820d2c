"""TensorBoard files without TensorFlow: what TensorBoard's own reader finds in them, beside what
CLU's TensorFlow writer writes, and the whole main job run with TensorFlow hidden."""

import glob
import io
import json
import os
import subprocess
import sys
import wave

import numpy as np
import pytest
from conftest import HIDE_TENSORFLOW, REPO, tiny_config, tiny_run_config, write_config
from PIL import Image

from dmjax import summaries


def read_events(logdir):
  """{tag: [(step, value)]} and {tag: plugin name} of the event files in `logdir`, read by
  TensorBoard's own reader (what its server uses), values as numpy arrays."""
  from tensorboard.backend.event_processing import plugin_event_accumulator as accumulator
  from tensorboard.util import tensor_util

  reader = accumulator.EventAccumulator(logdir, size_guidance={accumulator.TENSORS: 0})
  reader.Reload()
  values, plugins = {}, {}
  for tag in reader.Tags()["tensors"]:
    values[tag] = [(event.step, tensor_util.make_ndarray(event.tensor_proto))
                   for event in reader.Tensors(tag)]
    plugins[tag] = reader.SummaryMetadata(tag).plugin_data.plugin_name
  return values, plugins


def read_hparams(logdir):
  from tensorboard.backend.event_processing import plugin_event_accumulator as accumulator
  from tensorboard.plugins.hparams import metadata

  reader = accumulator.EventAccumulator(logdir)
  reader.Reload()
  content = reader.PluginTagToContent("hparams")[metadata.SESSION_START_INFO_TAG]
  info = metadata.parse_session_start_info_plugin_data(content)
  return {name: getattr(value, value.WhichOneof("kind")) for name, value in info.hparams.items()}


def decode_images(value):
  """An images-plugin tensor [width, height, PNG, ...] as (N, H, W, C) uint8."""
  width, height = int(value[0]), int(value[1])
  images = [np.asarray(Image.open(io.BytesIO(png))) for png in value[2:]]
  images = [x[..., None] if x.ndim == 2 else x for x in images]
  assert all(x.shape[:2] == (height, width) for x in images)
  return np.stack(images)


RNG = np.random.default_rng(0)
IMAGES = RNG.integers(0, 256, (2, 5, 7, 3), np.uint8)
GRAY = RNG.random((6, 4, 1)).astype(np.float32)
HPARAMS = {"model": {"name": "depthmasknet_v2", "width": 8}, "lr": 0.002, "blur": True,
           "init_from": None}


def write_everything(writer):
  writer.write_hparams(HPARAMS)
  writer.write_scalars(3, {"train/loss": np.float32(0.25), "train/rate": 2e-3})
  writer.write_scalars(7, {"train/loss": 0.125})
  writer.write_images(7, {"examples": IMAGES, "gray": GRAY})
  writer.write_texts(7, {"note": "hello"})
  writer.write_histograms(7, {"weights": np.linspace(-1, 1, 101)}, num_buckets={"weights": 4})
  writer.close()


def test_tensorboard_reads_back_what_the_writer_wrote(tmp_path):
  writer = summaries.TensorBoardWriter(str(tmp_path))
  write_everything(writer)
  values, plugins = read_events(str(tmp_path))
  assert plugins["train/loss"] == plugins["train/rate"] == "scalars"
  assert [(step, float(v)) for step, v in values["train/loss"]] == [(3, 0.25), (7, 0.125)]
  assert values["train/rate"][0][1].dtype == np.float32
  assert plugins["examples"] == plugins["gray"] == "images"
  ((step, examples),) = values["examples"]
  assert step == 7
  np.testing.assert_array_equal(decode_images(examples), IMAGES)
  np.testing.assert_array_equal(decode_images(values["gray"][0][1]),
                                np.round(GRAY[None] * 255).astype(np.uint8))
  assert plugins["note"] == "text" and values["note"][0][1] == b"hello"
  histogram = values["weights"][0][1]  # (buckets, 3): left edge, right edge, count.
  assert plugins["weights"] == "histograms" and histogram.shape == (4, 3)
  assert histogram[:, 2].sum() == 101
  assert read_hparams(str(tmp_path)) == {"model.name": "depthmasknet_v2", "model.width": 8,
                                         "lr": 0.002, "blur": True, "init_from": ""}


def test_audio_is_wav(tmp_path):
  writer = summaries.TensorBoardWriter(str(tmp_path))
  clip = np.sin(np.linspace(0, 20, 800, dtype=np.float32))[None, :, None] * 0.5
  writer.write_audios(1, {"tone": clip}, sample_rate=8000)
  writer.close()
  values, plugins = read_events(str(tmp_path))
  assert plugins["tone"] == "audio"
  (clips,) = [value for _, value in values["tone"]]  # TensorBoard drops the [k, 2]'s labels.
  with wave.open(io.BytesIO(clips[0])) as read:
    assert (read.getframerate(), read.getnchannels(), read.getnframes()) == (8000, 1, 800)
    samples = np.frombuffer(read.readframes(800), "<i2") / 32767
  np.testing.assert_allclose(samples, clip[0, :, 0], atol=1 / 32767)


def test_reads_back_as_clus_tensorflow_writer_does(tmp_path):
  pytest.importorskip("tensorflow")
  from clu.metric_writers.tf import summary_writer

  ours, theirs = str(tmp_path / "ours"), str(tmp_path / "theirs")
  write_everything(summaries.TensorBoardWriter(ours))
  write_everything(summary_writer.SummaryWriter(theirs))
  (our_values, our_plugins), (their_values, their_plugins) = read_events(ours), read_events(theirs)
  assert our_plugins == their_plugins
  assert read_hparams(ours) == read_hparams(theirs)
  for tag in ("train/loss", "train/rate", "examples", "note"):
    for (step, mine), (their_step, expected) in zip(our_values[tag], their_values[tag],
                                                    strict=True):
      assert step == their_step
      if tag == "examples":  # Both PNG; the bytes may differ, the pixels may not.
        np.testing.assert_array_equal(decode_images(mine), decode_images(expected))
      else:
        np.testing.assert_array_equal(mine, expected)


_MAIN_WITHOUT_TF = HIDE_TENSORFLOW + """
import runpy
sys.argv = ["dmjax.main", *sys.argv[1:]]
try:
  runpy.run_module("dmjax.main", run_name="__main__", alter_sys=True)
finally:
  print("tensorflow imported:", "tensorflow" in sys.modules)
"""


@pytest.mark.slow
def test_main_job_runs_without_tensorflow(tmp_path):
  # The `trained` fixture's run (its programs are in the compilation cache), on data this run
  # builds itself, through the command line.
  config = tiny_run_config(tiny_config(str(tmp_path / "tfds")))
  workdir = tmp_path / "run"
  result = subprocess.run(
      [sys.executable, "-c", _MAIN_WITHOUT_TF, f"--config={write_config(tmp_path, config)}",
       f"--workdir={workdir}"], cwd=REPO, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "tensorflow imported: False" in result.stdout
  assert glob.glob(str(tmp_path / "tfds" / "dmjax_synthetic" / "*" / "*" / "*.array_record*"))
  assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4", "6"]

  values, plugins = read_events(str(workdir))
  assert [step for step, _ in values["train/total"]] == [2, 4, 6]
  assert plugins["train/total"] == "scalars" and plugins["examples"] == "images"
  assert [step for step, _ in values["examples"]] == [4, 6]
  grid = decode_images(values["examples"][-1][1])
  assert grid.shape[0] == 1 and grid.shape[-1] == 3 and grid.std() > 0
  with open(workdir / "final_metrics.json") as f:
    final = json.load(f)
  ((step, logged),) = values["final/mask_iou"]
  assert step == 6 and float(logged) == pytest.approx(final["mask_iou"], rel=1e-6)
  hparams = read_hparams(str(workdir))
  assert hparams["model.name"] == config.model.name
  assert hparams["num_train_steps"] == 6
