"""Mask and depth for every frame of a video shot against a background plate.

  python -m dmjax.predict --workdir=DIR --bg=PLATE.jpg --video=CLIP.mp4 --out=OUT [--png_frames]

The plate is a photo of the empty scene from where the camera stands (BackgroundMattingV2's
"captured background"); every frame is a composite over it, so the plate and frame t are a pair
as `Predictor` takes them. The camera must not move: nothing registers the plate to the frames.
For a video NAME.EXT this writes in OUT, at the video's size and frame rate:

  NAME_mask.mp4          the mask probability as grey, white = the object
  NAME_depth.mp4         depth colour-mapped, dark = near (`dmjax.visualize.colorize`)
  NAME_mask/000000.png   with png_frames: frame 0's mask, 8-bit, as `dmjax.predict` writes photos
  NAME_depth/000000.png  with png_frames: frame 0's depth, 16-bit, 0 = nearest

The videos are H.264 in MP4. By default yuv420p at CRF 18, which every player and browser shows;
its quantisation moves mask values by a few levels of 255 and the chroma subsampling blurs the
depth colours (the grey mask has no chroma to lose). `lossless=True` writes H.264's lossless RGB
mode (QP 0) instead: the exact 8-bit values, for compositing, played by ffmpeg, VLC and mpv but
not by browsers or QuickTime. The PNG frames are exact either way.

Frames stream through: decoded, predicted `predictor.batch_size` at a time, encoded. A short last
batch is not padded with copies: `Predictor` runs it in batches of powers of two, shapes that
`Predictor.warm_up` compiles (in `fit="resize"` it pads to its own training size, where copies
cost little). Memory does not grow with the video's length. Frames are written at the input's
average rate, numbered from 0 (a variable-rate video comes out at a constant one); a rotation in
the video's metadata (phones) is applied, so frames and outputs stand upright as EXIF-rotated
photos do. Outputs are written under temporary names and renamed when complete; existing ones
are not replaced without `overwrite`.

Needs PyAV (`pip install -c constraints.txt -e ".[video]"`), whose wheels bundle FFmpeg.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fractions
import os
import tempfile
import time
from collections.abc import Iterable, Iterator
from typing import IO

import numpy as np

from dmjax import errors, files, progress
from dmjax.inference import photos
from dmjax.inference.predictor import Prediction, Predictor, image_size

CRF = 18  # x264's "visually lossless" end of its quality scale.
DEFAULT_RATE = fractions.Fraction(25)  # For a video that states no frame rate.
FRAME_NAME = "{:06d}.png"


def _av():
  try:
    import av
  except ImportError:
    raise errors.UserError('video needs PyAV: pip install -c constraints.txt -e ".[video]"'
                           ) from None
  return av


class VideoReader:
  """A video's frames as upright uint8 RGB (H, W, 3), in order; iterate once.

  Opening checks what would otherwise fail late: the file is a video, has a video stream and a
  first frame (decoded now; its size is the video's).
  """

  def __init__(self, path: str):
    av = _av()
    self.path = path
    if not os.path.isfile(path):
      raise FileNotFoundError(f"{path}: no such file")
    try:
      self._container = av.open(path)
    except (av.FFmpegError, OSError, UnicodeDecodeError) as e:
      raise errors.UserError(f"{path}: cannot read it as a video ({_reason(e)})") from None
    try:
      if not self._container.streams.video:
        raise errors.UserError(f"{path}: has no video frames (no video stream)")
      stream = self._container.streams.video[0]
      stream.thread_type = "AUTO"  # Decode on several threads; frames still come in order.
      self._frames = self._decode(stream)
      self._first = next(self._frames, None)
      if self._first is None:
        raise errors.UserError(f"{path}: has no video frames")
    except BaseException:
      self._container.close()
      raise
    self.height, self.width = self._first.shape[:2]
    self.rate = fractions.Fraction(stream.average_rate or stream.guessed_rate or DEFAULT_RATE)
    self.num_frames: int | None = stream.frames or None  # 0: the container does not say.

  def _decode(self, stream) -> Iterator[np.ndarray]:
    av = _av()
    index = 0
    try:
      for frame in self._container.decode(stream):
        image = frame.to_ndarray(format="rgb24")
        # The display matrix turns the picture counter-clockwise by `rotation` degrees.
        turns = round((frame.rotation or 0) / 90) % 4
        yield np.ascontiguousarray(np.rot90(image, turns)) if turns else image
        index += 1
    except av.FFmpegError as e:
      raise errors.UserError(f"{self.path}: cannot decode frame {index} ({_reason(e)})") from None

  def __iter__(self) -> Iterator[np.ndarray]:
    first, self._first = self._first, None
    if first is None:
      raise RuntimeError(f"{self.path}: frames already read")
    yield first
    yield from self._frames

  def close(self) -> None:
    self._container.close()

  def __enter__(self) -> VideoReader:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()


def _reason(error: Exception) -> str:
  return getattr(error, "strerror", None) or str(error)


class VideoWriter:
  """H.264 in MP4 to an open binary file, frame by frame: uint8 RGB (H, W, 3) or grey (H, W)."""

  def __init__(self, file: IO[bytes], *, width: int, height: int, rate: fractions.Fraction,
               lossless: bool = False):
    av = _av()
    self._container = av.open(file, "w", format="mp4")
    if lossless:
      codec, pix_fmt, options = "libx264rgb", "rgb24", {"qp": "0"}
    else:
      # 4:2:0 needs even sides; odd ones keep full chroma (fewer players, but no cropping).
      even = width % 2 == 0 and height % 2 == 0
      codec, pix_fmt, options = "libx264", "yuv420p" if even else "yuv444p", {"crf": str(CRF)}
    self._stream = self._container.add_stream(codec, rate=rate)
    self._stream.width, self._stream.height = width, height
    self._stream.pix_fmt = pix_fmt
    self._stream.options = options
    self._count = 0

  def write(self, image: np.ndarray) -> None:
    av = _av()
    frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image),
                                       format="rgb24" if image.ndim == 3 else "gray")
    frame.pts = self._count  # In frames: the encoder's time base is 1 / rate.
    self._count += 1
    for packet in self._stream.encode(frame):
      self._container.mux(packet)

  def close(self) -> None:
    for packet in self._stream.encode(None):  # What the encoder still holds.
      self._container.mux(packet)
    self._container.close()


def load_plate(path: str, video: VideoReader) -> np.ndarray:
  """The background plate, uint8 RGB; refuses one whose size is not the video's."""
  plate = photos.read_image(path)
  if plate.shape[:2] != (video.height, video.width):
    raise errors.UserError(f"{path}: the plate is {image_size(plate)} but the video "
                           f"{video.path} is {video.width}×{video.height}; they must be the "
                           "same size (the plate shot from the video's camera position)")
  return plate


def predict_frames(predictor: Predictor, plate: np.ndarray,
                   frames: Iterable[np.ndarray]) -> Iterator[Prediction]:
  """The prediction for each frame over `plate`, in order, `predictor.batch_size` frames per
  model call (the short last batch as `Predictor.predict_pairs` splits it, never padded with
  copies)."""
  batch: list[np.ndarray] = []
  for frame in frames:
    batch.append(frame)
    if len(batch) == predictor.batch_size:
      yield from predictor.predict_pairs([(plate, f) for f in batch])
      batch = []
  if batch:
    yield from predictor.predict_pairs([(plate, f) for f in batch])


def output_paths(out_dir: str, name: str, png_frames: bool) -> dict[str, str]:
  """Where `predict_video` writes, by kind: mask_video, depth_video[, mask_frames,
  depth_frames] (folders of PNGs)."""
  paths = {f"{kind}_video": os.path.join(out_dir, f"{name}_{kind}.mp4")
           for kind in ("mask", "depth")}
  if png_frames:
    paths.update({f"{kind}_frames": os.path.join(out_dir, f"{name}_{kind}")
                  for kind in ("mask", "depth")})
  return paths


def check_outputs(paths: dict[str, str], overwrite: bool) -> None:
  if not overwrite:
    for path in paths.values():
      if os.path.exists(path):
        raise errors.UserError(f"{path}: exists; pass --overwrite to replace it")


@dataclasses.dataclass(frozen=True)
class VideoResult:
  frames: int
  seconds: float  # Decoding, predicting and encoding, after the video was opened.
  paths: dict[str, str]

  @property
  def frames_per_second(self) -> float:
    return self.frames / self.seconds


def predict_video(predictor: Predictor, plate: np.ndarray, video: VideoReader, out_dir: str, *,
                  name: str, png_frames: bool = False, lossless: bool = False,
                  overwrite: bool = False, show_progress: bool = True) -> VideoResult:
  """Predicts every frame of `video` over `plate` and writes the outputs (module docstring)."""
  if plate.shape[:2] != (video.height, video.width):
    raise errors.UserError(f"the plate is {image_size(plate)} but the video {video.path} is "
                           f"{video.width}×{video.height}")
  paths = output_paths(out_dir, name, png_frames)
  check_outputs(paths, overwrite)
  os.makedirs(out_dir, exist_ok=True)
  start = time.perf_counter()
  count = 0
  bar = (progress.Progress(f"video {name}", total=video.num_frames, unit="frames")
         if show_progress else contextlib.nullcontext())
  with contextlib.ExitStack() as stack:
    stack.enter_context(bar)
    writers = {}
    for kind in ("mask", "depth"):
      # Renamed into place when the stack closes without an error; removed otherwise.
      file = stack.enter_context(files.atomic_open(paths[f"{kind}_video"]))
      writers[kind] = VideoWriter(file, width=video.width, height=video.height, rate=video.rate,
                                  lossless=lossless)
      stack.callback(writers[kind].close)  # Runs before the rename (callbacks unwind first).
    folders = ({kind: stack.enter_context(files.atomic_folder(paths[f"{kind}_frames"]))
                for kind in ("mask", "depth")} if png_frames else {})
    for prediction in predict_frames(predictor, plate, video):
      images = photos.output_images(prediction)
      writers["mask"].write(images["mask"])
      writers["depth"].write(images["depth_color"])
      if folders:
        for kind in ("mask", "depth"):
          files.write_png(os.path.join(folders[kind], FRAME_NAME.format(count)), images[kind])
      count += 1
      if show_progress and count % predictor.batch_size == 0:
        bar.update(count)  # Per batch: its frames come out together, after the model call.
    if show_progress:
      bar.update(count)
  return VideoResult(count, time.perf_counter() - start, paths)


def measure_video_frames(predictor: Predictor, *, size: tuple[int, int] = (256, 256),
                         frames: int = 48, batch_size: int = 8) -> dict:
  """Frames per second of the whole video path (decode, predict, encode) on a generated clip of
  `frames` frames of `size` (height, width): a disc crossing a smooth plate. The first batch
  (compiling) is run once before the timing, on the same clip."""
  height, width = size
  predictor = dataclasses.replace(predictor, batch_size=batch_size)
  rows, cols = np.mgrid[0:height, 0:width] / max(height, width)
  plate = np.stack([rows * 200 + 30, cols * 150 + 50, np.full_like(rows, 90.0)], axis=-1)
  plate = plate.astype(np.uint8)
  with tempfile.TemporaryDirectory() as folder:
    clip = os.path.join(folder, "clip.mp4")
    with open(clip, "wb") as f:
      writer = VideoWriter(f, width=width, height=height, rate=DEFAULT_RATE)
      for t in range(frames):
        center = 0.2 + 0.6 * t / max(frames - 1, 1)
        inside = (rows - 0.5 * height / max(height, width)) ** 2 + (cols - center) ** 2 < 0.02
        writer.write(np.where(inside[..., None], np.uint8([240, 60, 40]), plate))
      writer.close()
    with VideoReader(clip) as video:  # Warm-up: compiles the one batch shape.
      predict_video(predictor, plate, video, os.path.join(folder, "warmup"), name="clip",
                    show_progress=False)
    with VideoReader(clip) as video:
      result = predict_video(predictor, plate, video, os.path.join(folder, "out"), name="clip",
                             show_progress=False)
  return {"what": "video", "height": height, "width": width, "frames": result.frames,
          "batch_size": batch_size, "fit": predictor.fit, "seconds": round(result.seconds, 6),
          "frames_per_second": round(result.frames_per_second, 2)}

