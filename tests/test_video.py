"""Video against a background plate: a rendered clip whose object moves, through the video path.

The input clip is written losslessly (H.264's RGB mode at QP 0, checked below to decode to the
rendered pixels), so the truth masks are exact for what the model sees and any loss is the
outputs' own. Two models: a real tiny one at its initial weights, through which the video path
must give what `Predictor` gives frame by frame; and a fixed plate-difference model whose right
answer is known, through which the written mask video must match the rendered truth.
"""

import functools
import os

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import read_png, run_command

from dmjax import errors, files, inference, predict, visualize
from dmjax.data import schema, synthetic
from dmjax.inference import video

av = pytest.importorskip("av", reason="the video extra: pip install -e '.[video]'")

HEIGHT, WIDTH = 48, 64  # Not square: a transposed frame cannot pass.
SHIFTS = (-12, -8, -4, 0, 4, 8, 12)  # The object's offset in pixels, frame by frame.
BATCH = 4  # 7 frames: one full batch and a short one.
RATE = 25
THRESHOLD = 20  # Of 255: the plate-difference model's "this pixel changed".
# Clean shots: no misalignment, lighting change, noise or blur between the plate and the frames.
CLEAN = synthetic.Realism(max_shift_px_at_80=0, nudge_probability=0, jitter_px_at_80=0,
                          exposure_mismatch=0, white_balance_mismatch=0, lighting_tilt=0,
                          noise_levels=(0, 0), jpeg_quality=(95, 95), blur_probability=0,
                          shadow_strength=0, camouflage_probability=0)


def _shift(image, dx):
  out = np.zeros_like(image)
  if dx >= 0:
    out[:, dx:] = image[:, :image.shape[1] - dx]
  else:
    out[:, :dx] = image[:, -dx:]
  return out


def _write_clip(path, frames):
  with av.open(str(path), "w") as container:
    stream = container.add_stream("libx264rgb", rate=RATE)
    stream.width, stream.height = frames[0].shape[1], frames[0].shape[0]
    stream.pix_fmt, stream.options = "rgb24", {"qp": "0"}  # Lossless.
    for frame in frames:
      container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
    container.mux(stream.encode(None))
  return str(path)


def _decode(path):
  with av.open(str(path)) as container:
    stream = container.streams.video[0]
    frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
    return frames, stream.average_rate


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
  """Test scene 11 at 64 px (its object covers 8 % of the frame), cropped to 48 × 64, with its
  object cut out and moved across the empty room 4 px a frame: plate, frames, truth, paths."""
  scene = synthetic.render_scene("test", 11, resolution=64, realism=CLEAN)
  plate = scene.bg[-HEIGHT:]
  alpha = scene.mask[-HEIGHT:].astype(np.float32) / 255
  cutout = scene.fg_bg[-HEIGHT:].astype(np.float32)
  frames, truth = [], []
  for dx in SHIFTS:
    a = _shift(alpha, dx)
    frames.append(np.round(plate * (1 - a) + _shift(cutout, dx) * a).astype(np.uint8))
    truth.append(a[..., 0] >= 0.5)
  folder = tmp_path_factory.mktemp("clip")
  plate_path = str(folder / "plate.png")
  files.write_png(plate_path, plate)
  return {"plate": plate, "frames": frames, "truth": truth, "plate_path": plate_path,
          "path": _write_clip(folder / "clip.mp4", frames)}


@pytest.fixture(scope="module")
def workdir(untrained_workdir):
  return untrained_workdir


@pytest.fixture(scope="module")
def reference(workdir, clip):
  """`Predictor` on each frame alone (batches of one): what the video path must reproduce."""
  predictor = inference.Predictor.from_workdir(workdir, batch_size=1)
  return [predictor(clip["plate"], frame) for frame in clip["frames"]]


def test_the_clip_decodes_to_the_rendered_frames(clip):
  frames, rate = _decode(clip["path"])
  assert len(frames) == len(SHIFTS) and rate == RATE
  np.testing.assert_array_equal(np.stack(frames), np.stack(clip["frames"]))
  # And the object moves: no two frames' truths are alike.
  assert all((a ^ b).sum() > 50 for a, b in zip(clip["truth"], clip["truth"][1:], strict=False))


def test_video_path_equals_the_predictor_frame_by_frame(workdir, clip, reference):
  predictor = inference.Predictor.from_workdir(workdir, batch_size=BATCH)
  with video.VideoReader(clip["path"]) as reader:
    assert (reader.height, reader.width, reader.num_frames) == (HEIGHT, WIDTH, len(SHIFTS))
    predictions = list(video.predict_frames(predictor, clip["plate"], reader))
  assert len(predictions) == len(SHIFTS)
  for got, expected in zip(predictions, reference, strict=True):
    np.testing.assert_allclose(got.mask, expected.mask, atol=1e-6)
    np.testing.assert_allclose(got.depth, expected.depth, atol=1e-6)
  # The whole-frame pass: a batch of 4, then the last 3 frames as 2 + 1, no copies run.
  frame_shape = predictor._cascade.frame_shape(HEIGHT, WIDTH)
  frame_calls = {batch: count for (batch, *shape), count in predictor.calls.items()
                 if tuple(shape) == frame_shape}
  assert frame_calls == {BATCH: 1, 2: 1, 1: 1}


def test_predict_command_writes_videos_and_frames(workdir, clip, reference, tmp_path, capsys):
  out = tmp_path / "out"
  assert predict.main([f"--workdir={workdir}", f"--bg={clip['plate_path']}",
                       f"--video={clip['path']}", f"--out={out}", "--png_frames",
                       f"--batch_size={BATCH}"]) is None
  assert f"video clip: {len(SHIFTS)}/{len(SHIFTS)} frames" in capsys.readouterr().err
  assert sorted(os.listdir(out)) == ["clip_depth", "clip_depth.mp4", "clip_mask", "clip_mask.mp4"]
  masks, depths = [], []
  for index, expected in enumerate(reference):
    mode, mask = read_png(out / "clip_mask" / f"{index:06d}.png")
    assert mode == "L"
    np.testing.assert_array_equal(mask, np.round(expected.mask * 255))
    mode, depth = read_png(out / "clip_depth" / f"{index:06d}.png")
    assert mode.startswith("I;16") or mode == "I"
    np.testing.assert_array_equal(depth, np.round(expected.depth * schema.DEPTH_MAX_CODE))
    masks.append(mask)
    depths.append(expected.depth)
  assert len(os.listdir(out / "clip_mask")) == len(SHIFTS)

  mask_video, rate = _decode(out / "clip_mask.mp4")
  assert rate == RATE and len(mask_video) == len(SHIFTS)
  assert mask_video[0].shape == (HEIGHT, WIDTH, 3)
  # yuv420p at CRF 18: grey stays grey, within a few levels (limited-range luma, quantisation).
  difference = np.abs(np.stack(mask_video).astype(int) - np.stack(masks)[..., None])
  assert difference.mean() < 1.5 and difference.max() <= 12
  depth_video, _ = _decode(out / "clip_depth.mp4")
  assert len(depth_video) == len(SHIFTS) and depth_video[0].shape == (HEIGHT, WIDTH, 3)
  colours = np.stack([visualize.colorize(d) for d in depths])
  assert np.abs(np.stack(depth_video).astype(int) - colours).mean() < 4


class PlateDifference(nn.Module):
  """Fixed weights, a known answer: the object is where some channel of the frame differs from
  the plate by more than THRESHOLD levels (the classic plate matte); depth from the rows."""

  @nn.compact
  def __call__(self, bg, fg_bg, train=False):
    del train
    plate, frame = ((x - offset) / scale for x, (scale, offset) in
                    ((bg, schema.photo_normalization("bg")),
                     (fg_bg, schema.photo_normalization("fg_bg"))))  # Back to 0..255.
    difference = jnp.abs(frame - plate).max(axis=-1, keepdims=True)
    rows = jnp.linspace(-2.0, 2.0, bg.shape[1])[None, :, None, None]
    return {"mask": (difference - THRESHOLD) / 2.0,
            "depth": jnp.broadcast_to(rows, difference.shape)}


def _iou(a, b):
  return (a & b).sum() / (a | b).sum()


def test_mask_video_matches_the_rendered_truth(clip, tmp_path):
  predictor = inference.Predictor(model=PlateDifference(), variables={}, resolution=64, fit="pad",
                                  batch_size=BATCH)
  # What this model scores on the rendered frames as stills (no video anywhere): 0.93-0.96.
  stills = [_iou(predictor(clip["plate"], f).mask >= 0.5, t)
            for f, t in zip(clip["frames"], clip["truth"], strict=True)]
  assert min(stills) > 0.9
  for lossless in (False, True):
    out = tmp_path / f"lossless_{lossless}"
    with video.VideoReader(clip["path"]) as reader:
      result = video.predict_video(predictor, clip["plate"], reader, str(out), name="clip",
                                   png_frames=lossless, lossless=lossless)
    assert result.frames == len(SHIFTS)
    mask_video, _ = _decode(result.paths["mask_video"])
    ious = [_iou(m[..., 0] >= 128, t) for m, t in zip(mask_video, clip["truth"], strict=True)]
    # Decoding the clip and encoding the masks may only cost edge pixels.
    np.testing.assert_allclose(ious, stills, atol=0.02)
    if lossless:  # The exact 8-bit values: the same as the PNG frames.
      for index, frame in enumerate(mask_video):
        _, png = read_png(out / "clip_mask" / f"{index:06d}.png")
        np.testing.assert_array_equal(frame, np.repeat(png[..., None], 3, axis=-1))

  # Again over the last outputs: refused, then replaced whole with overwrite, nothing left over.
  (out / "clip_mask" / "stale.png").write_bytes(b"")
  with video.VideoReader(clip["path"]) as reader, pytest.raises(errors.UserError, match="exists"):
    video.predict_video(predictor, clip["plate"], reader, str(out), name="clip", png_frames=True)
  with video.VideoReader(clip["path"]) as reader:
    video.predict_video(predictor, clip["plate"], reader, str(out), name="clip", png_frames=True,
                        overwrite=True, show_progress=False)
  assert sorted(os.listdir(out)) == ["clip_depth", "clip_depth.mp4", "clip_mask", "clip_mask.mp4"]
  assert len(os.listdir(out / "clip_mask")) == len(SHIFTS)


def test_measure_video_frames():
  predictor = inference.Predictor(model=PlateDifference(), variables={}, resolution=64, fit="pad")
  row = video.measure_video_frames(predictor, size=(32, 48), frames=6, batch_size=4)
  assert (row["frames"], row["height"], row["width"], row["batch_size"]) == (6, 32, 48, 4)
  # Both rounded: seconds to the microsecond, frames/s to 0.01 (a clip may take a few ms).
  assert row["frames_per_second"] == pytest.approx(6 / row["seconds"], rel=0.05)


run_main = functools.partial(run_command, predict.main)


def test_bad_plates_and_videos_get_one_line(workdir, clip, tmp_path):
  out = tmp_path / "out"
  common = (f"--workdir={workdir}", f"--out={out}")
  small = tmp_path / "small.png"
  files.write_png(str(small), clip["plate"][:32])
  message = run_main(*common, f"--bg={small}", f"--video={clip['path']}")
  assert message == (f"error: {small}: the plate is 64×32 but the video {clip['path']} is 64×48; "
                     "they must be the same size (the plate shot from the video's camera position)")

  not_video = tmp_path / "notes.mp4"
  not_video.write_text("not a video\n")
  message = run_main(*common, f"--bg={clip['plate_path']}", f"--video={not_video}")
  assert message.startswith(f"error: {not_video}: cannot read it as a video (")
  assert "\n" not in message

  # A recording stopped before its first frame: a stream is declared, no frame written.
  empty = tmp_path / "empty.mp4"
  with av.open(str(empty), "w") as container:
    stream = container.add_stream("libx264", rate=RATE)
    stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
    container.start_encoding()
  message = run_main(*common, f"--bg={clip['plate_path']}", f"--video={empty}")
  assert message == f"error: {empty}: has no video frames (no video stream)"

  message = run_main(*common, f"--bg={clip['plate_path']}", f"--video={tmp_path / 'gone.mp4'}")
  assert message == f"error: {tmp_path / 'gone.mp4'}: no such file"
  message = run_main(*common, f"--fg_bg={small}", f"--video={clip['path']}")
  assert message.startswith("error: --video takes one --bg (the plate)")
  assert not out.exists()  # Nothing written for any of these.

  out.mkdir()
  (out / "clip_depth.mp4").write_bytes(b"mine")
  message = run_main(*common, f"--bg={clip['plate_path']}", f"--video={clip['path']}")
  assert message == f"error: {out / 'clip_depth.mp4'}: exists; pass --overwrite to replace it"
  assert (out / "clip_depth.mp4").read_bytes() == b"mine"
