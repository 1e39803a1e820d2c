
"""CLU's metric writers, writing TensorBoard event files with or without TensorFlow.

CLU's `metric_writers` package imports its TensorFlow summary writer as the package loads (clu
0.0.12; the lazy import of google/CommonLoopUtils#358 is not released), so without TensorFlow
not even `MetricWriter`, `create_default_writer` or `clu.periodic_actions` can be imported. The
GPU machines people train on often have no TensorFlow beside a CUDA JAX.

`metric_writers()` returns CLU's package. Where TensorFlow is installed it is CLU's own, with
its TensorFlow `SummaryWriter`. Where it is not, the one module that needs TensorFlow
(`clu.metric_writers.summary_writer`) is replaced, before the package is first imported, by one
whose `SummaryWriter(logdir)` makes a `TensorBoardWriter`: a `MetricWriter` that writes the same
summaries (TensorBoard's own protos, as `tf.summary` writes them) through TensorBoard's
TensorFlow-free event file writer. Everything else in CLU (`create_default_writer`, the
asynchronous and logging writers, `periodic_actions`) is then unchanged, and TensorBoard reads
the files the same way.

Import CLU's writers and periodic actions only after calling `metric_writers()`.
"""

from __future__ import annotations

import functools
import importlib.util
import io
import sys
import time
import types
import wave
from collections.abc import Mapping
from typing import Any

import numpy as np
from absl import logging

from dmjax import files

_CLU_TF_WRITER = "clu.metric_writers.summary_writer"


def tensorflow_available() -> bool:
  return importlib.util.find_spec("tensorflow") is not None


def metric_writers() -> types.ModuleType:
  """`clu.metric_writers`, importable whether or not TensorFlow is installed."""
  if "clu.metric_writers" not in sys.modules and not tensorflow_available():
    stand_in = types.ModuleType(
        _CLU_TF_WRITER, "dmjax.summaries' TensorFlow-free stand-in for CLU's SummaryWriter.")
    # A function, not the class: the class derives from CLU's MetricWriter, which can only be
    # imported once this stand-in is in place.
    stand_in.SummaryWriter = lambda logdir: _writer_class()(logdir)
    sys.modules.setdefault(_CLU_TF_WRITER, stand_in)
  from clu import metric_writers as module  # noqa: PLC0415

  return module


def create_default_writer(logdir: str, *, just_logging: bool = False):
  """CLU's default writer: the log, plus TensorBoard files in `logdir` unless `just_logging`."""
  return metric_writers().create_default_writer(logdir, just_logging=just_logging)


def _summary_pb2():
  from tensorboard.compat.proto import summary_pb2  # noqa: PLC0415

  return summary_pb2


def _tensor_proto(values: np.ndarray):
  from tensorboard.util import tensor_util  # noqa: PLC0415

  return tensor_util.make_tensor_proto(values)


def png_bytes(image: np.ndarray) -> bytes:
  """PNG of an (H, W, C) image, C in 1, 3, 4: uint8 as it is, floats in [0, 1] scaled by 255
  and rounded (tf.summary.image also saturates floats outside [0, 1])."""
  if image.dtype != np.uint8:
    image = np.round(np.clip(np.asarray(image, np.float64), 0.0, 1.0) * 255.0).astype(np.uint8)
  if image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
    raise ValueError(f"an image must be (H, W, 1|3|4), got {image.shape}")
  return files.png_bytes(image)


def wav_bytes(samples: np.ndarray, sample_rate: int) -> bytes:
  """16-bit PCM WAV of (num_samples, channels) floats in [-1, 1]."""
  pcm = np.round(np.clip(samples, -1.0, 1.0) * 32767).astype("<i2")
  buffer = io.BytesIO()
  with wave.open(buffer, "wb") as out:
    out.setnchannels(pcm.shape[1])
    out.setsampwidth(2)
    out.setframerate(int(sample_rate))
    out.writeframes(pcm.tobytes())
  return buffer.getvalue()


@functools.cache
def _writer_class():
  interface = metric_writers().interface

  class TensorBoardWriter(interface.MetricWriter):
    """A CLU `MetricWriter` writing TensorBoard event files without TensorFlow.

    Each summary is the proto `tf.summary.*` writes (a tensor with its plugin's metadata):
    scalars as float32, images as [width, height, PNG...] strings, texts, histograms, audio as
    WAV, hparams as the hparams plugin's session start. Videos are not supported (as in CLU's
    TensorFlow writer: a warning).
    """

    def __init__(self, logdir: str):
      super().__init__()
      from tensorboard.summary.writer import event_file_writer  # noqa: PLC0415

      self._events = event_file_writer.EventFileWriter(logdir)

    def _write(self, step: int, summary) -> None:
      from tensorboard.compat.proto import event_pb2  # noqa: PLC0415

      self._events.add_event(event_pb2.Event(wall_time=time.time(), step=int(step),
                                             summary=summary))

    def _write_tensor(self, step: int, tag: str, tensor, metadata) -> None:
      summary = _summary_pb2().Summary()
      summary.value.add(tag=tag, tensor=tensor, metadata=metadata)
      self._write(step, summary)

    def write_summaries(self, step: int, values: Mapping[str, Any],
                        metadata: Mapping[str, Any] | None = None) -> None:
      for key, value in values.items():
        given = (metadata or {}).get(key)
        if isinstance(given, bytes):
          given = _summary_pb2().SummaryMetadata.FromString(given)
        self._write_tensor(step, key, _tensor_proto(np.asarray(value)),
                           given or _summary_pb2().SummaryMetadata())

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
      from tensorboard.plugins.scalar import summary_v2  # noqa: PLC0415

      for key, value in scalars.items():
        self._write(step, summary_v2.scalar_pb(key, np.asarray(value, np.float32)))

    def write_images(self, step: int, images: Mapping[str, Any]) -> None:
      from tensorboard.plugins.image import metadata  # noqa: PLC0415

      for key, value in images.items():
        value = np.asarray(value)
        value = value[None] if value.ndim == 3 else value
        if value.ndim != 4:
          raise ValueError(f"image {key!r}: expected (N, H, W, C) or (H, W, C), got "
                           f"{value.shape}")
        height, width = value.shape[1:3]
        encoded = [str(width).encode(), str(height).encode(), *(png_bytes(x) for x in value)]
        self._write_tensor(step, key, _tensor_proto(np.array(encoded, dtype=object)),
                           metadata.create_summary_metadata(display_name=None, description=None))

    def write_videos(self, step: int, videos: Mapping[str, Any]) -> None:
      del step, videos
      logging.log_first_n(logging.WARNING, "TensorBoardWriter does not write videos.", 1)

    def write_audios(self, step: int, audios: Mapping[str, Any], *, sample_rate: int) -> None:
      from tensorboard.plugins.audio import metadata  # noqa: PLC0415

      for key, value in audios.items():
        clips = np.asarray(value, np.float32)  # (N, num_samples, channels), as CLU documents.
        encoded = np.array([[wav_bytes(clip, sample_rate), b""] for clip in clips], dtype=object)
        self._write_tensor(step, key, _tensor_proto(encoded), metadata.create_summary_metadata(
            display_name=None, description=None, encoding=metadata.Encoding.Value("WAV")))

    def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
      from tensorboard.plugins.text import summary_v2  # noqa: PLC0415

      for key, value in texts.items():
        self._write(step, summary_v2.text_pb(key, value))

    def write_histograms(self, step: int, arrays: Mapping[str, Any],
                         num_buckets: Mapping[str, int] | None = None) -> None:
      from tensorboard.plugins.histogram import summary_v2  # noqa: PLC0415

      for key, value in arrays.items():
        buckets = (num_buckets or {}).get(key)
        self._write(step, summary_v2.histogram_pb(key, np.asarray(value, np.float64),
                                                  buckets=buckets))

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
      from clu.internal import utils  # noqa: PLC0415
      from tensorboard.plugins.hparams import summary_v2  # noqa: PLC0415

      # As CLU's writer: nested keys joined by dots, None as "".
      self._write(0, summary_v2.hparams_pb(dict(utils.flatten_dict(hparams))))

    def flush(self) -> None:
      self._events.flush()

    def close(self) -> None:
      self._events.close()

  return TensorBoardWriter


def __getattr__(name: str):
  # `TensorBoardWriter` is defined on first use: its base class is CLU's, see metric_writers().
  if name == "TensorBoardWriter":
    return _writer_class()
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
