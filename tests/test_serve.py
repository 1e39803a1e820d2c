"""The web app and HTTP API (dmjax.serve, dmjax.inference.server) over real loopback HTTP: good
pairs and every output, refusals (hostile files, cross-site requests, bodies too large or too
slow, a busy server), concurrent clients sharing the model, readiness, the page in headless
chromium, the command."""

import base64
import concurrent.futures
import contextlib
import importlib.util
import io
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib

import jax
import numpy as np
import pytest
import requests
from conftest import REPO, run_command
from PIL import Image

# The `serve` extra; CI installs it, so there a missing one fails instead of skipping.
_MISSING = [m for m in ("starlette", "uvicorn", "multipart") if importlib.util.find_spec(m) is None]
if _MISSING and not os.environ.get("CI"):
  pytest.skip(f"needs the serve extra (missing {_MISSING}): pip install -e \".[serve]\"",
              allow_module_level=True)

from absl import flags  # noqa: E402

from dmjax import cli, progress, serve  # noqa: E402
from dmjax.inference import Predictor, compilations, exported, outputs, photos, server  # noqa: E402

HEIGHT, WIDTH = 40, 48
MAX_UPLOAD_BYTES = 200_000
MAX_PIXELS = 64 * 64
LOWERING_EVENT = "/jax/core/compile/jaxpr_to_mlir_module_duration"
LAN_NAME = "photos.lan"  # A name the served app is told it is reached by.


@pytest.fixture(scope="module")
def workdir(untrained_workdir):
  return untrained_workdir


@pytest.fixture(scope="module")
def predictor(workdir):
  return Predictor.from_workdir(workdir)


@pytest.fixture(scope="module")
def served(predictor, workdir):
  """(base URL, app) of the app served by uvicorn in a thread of this process."""
  app = server.create_app(predictor, max_upload_bytes=MAX_UPLOAD_BYTES, max_pixels=MAX_PIXELS,
                          hosts=server.allowed_hosts("127.0.0.1", [LAN_NAME]), source=workdir,
                          read_timeout_s=20)
  with server.running_server(app) as url:
    yield url, app


@contextlib.contextmanager
def serving(predictor, **settings):
  """(base URL, app) of another app over `predictor`, for settings the shared one lacks."""
  app = server.create_app(predictor, **{"max_upload_bytes": MAX_UPLOAD_BYTES,
                                        "max_pixels": MAX_PIXELS, **settings})
  with server.running_server(app) as url:
    yield url, app


def png(array, mode=None) -> bytes:
  image = Image.fromarray(array)
  buffer = io.BytesIO()
  (image.convert(mode) if mode else image).save(buffer, format="PNG")
  return buffer.getvalue()


def post_pair(url, bg, fg_bg, query="", headers=None, bg_name="bg.png", fg_bg_name="fg_bg.png",
              new_bg=None):
  files = {"bg": (bg_name, bg if isinstance(bg, bytes) else png(bg), "image/png"),
           "fg_bg": (fg_bg_name, fg_bg if isinstance(fg_bg, bytes) else png(fg_bg), "image/png")}
  if new_bg is not None:
    files["replace_bg"] = ("beach.png", new_bg if isinstance(new_bg, bytes) else png(new_bg),
                           "image/png")
  return requests.post(f"{url}/predict{query}", files=files, headers=headers, timeout=300)


def decode(data_or_b64, base64_encoded=True):
  data = base64.b64decode(data_or_b64) if base64_encoded else data_or_b64
  with Image.open(io.BytesIO(data)) as image:
    return image.mode, np.asarray(image)


@contextlib.contextmanager
def counting_lowerings():
  """A list that gets one entry per JAX program lowered (a jit cache miss) in this process."""
  lowered = []

  def listener(event, duration, **kwargs):
    if event == LOWERING_EVENT:
      lowered.append(duration)

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    yield lowered
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)


NEW_BG = photos.demo_pair(30, 70, seed=9)[0]  # Another shape than the pair's: fitted to cover.


def test_a_good_pair_gives_the_predict_tools_outputs(served, predictor):
  url, _ = served
  bg, fg_bg = photos.demo_pair(HEIGHT, WIDTH, seed=1)
  response = post_pair(url, bg, fg_bg, fg_bg_name="kitchen.jpg.png", new_bg=NEW_BG)
  assert response.status_code == 200, response.text
  answer = response.json()
  assert (answer["name"], answer["width"], answer["height"]) == ("kitchen.jpg", WIDTH, HEIGHT)
  expected = predictor(bg, fg_bg)  # The Predictor is tested against the model in test_predict.

  mode, mask = decode(answer["mask"])
  assert mode == "L" and mask.shape == (HEIGHT, WIDTH)
  np.testing.assert_array_equal(mask, np.round(expected.mask * 255))
  mode, depth = decode(answer["depth"])
  assert mode.startswith("I;16") and depth.shape == (HEIGHT, WIDTH)
  np.testing.assert_array_equal(depth, np.round(expected.depth * 65535))
  mode, depth_color = decode(answer["depth_color"])
  assert mode == "RGB" and depth_color.shape == (HEIGHT, WIDTH, 3)
  # Dark is near: the colour's brightness follows depth.
  brightness = depth_color.astype(float).sum(-1).ravel()
  assert np.corrcoef(brightness, expected.depth.ravel())[0, 1] > 0.9
  mode, overlay = decode(answer["overlay"])
  alpha = 0.6 * expected.mask[..., None]
  tinted = fg_bg * (1 - alpha) + np.array([255, 40, 40]) * alpha  # Red at 60 % of the mask.
  assert mode == "RGB" and overlay.shape == (HEIGHT, WIDTH, 3)
  assert np.abs(overlay.astype(float) - tinted).max() <= 1
  # The cut-out: the composite's own colours, the soft mask (not a thresholded one) as alpha.
  mode, cutout = decode(answer["cutout"])
  assert mode == "RGBA" and cutout.shape == (HEIGHT, WIDTH, 4)
  np.testing.assert_array_equal(cutout[..., :3], fg_bg)
  np.testing.assert_array_equal(cutout[..., 3], np.round(expected.mask * 255))
  assert len(np.unique(cutout[..., 3])) > 2
  # The object over the third photo, fitted to the composite's size.
  mode, replaced = decode(answer["replace_bg"])
  assert mode == "RGB" and replaced.shape == (HEIGHT, WIDTH, 3)
  fitted = outputs.fit_cover(NEW_BG, HEIGHT, WIDTH).astype(float)
  alpha = expected.mask[..., None]
  np.testing.assert_allclose(replaced, alpha * fg_bg + (1 - alpha) * fitted, atol=0.51)
  # Without a third photo, no replace_bg.
  assert "replace_bg" not in post_pair(url, bg, fg_bg).json()


def test_one_png_by_format_or_accept(served):
  url, _ = served
  bg, fg_bg = photos.demo_pair(HEIGHT, WIDTH, seed=1)
  answer = post_pair(url, bg, fg_bg, new_bg=NEW_BG).json()
  for kind in server.PNG_KINDS:
    response = post_pair(url, bg, fg_bg, query=f"?format={kind}", new_bg=NEW_BG)
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    assert f'filename="fg_bg_{kind}.png"' in response.headers["content-disposition"]
    np.testing.assert_array_equal(decode(response.content, False)[1], decode(answer[kind])[1])
  response = post_pair(url, bg, fg_bg, headers={"Accept": "image/png"})
  assert response.headers["content-type"] == "image/png"
  np.testing.assert_array_equal(decode(response.content, False)[1], decode(answer["mask"])[1])
  response = post_pair(url, bg, fg_bg, query="?format=replace_bg")
  assert response.status_code == 400
  assert "format=replace_bg needs a third file 'replace_bg'" in response.json()["error"]


def filename_star(header: str) -> str:
  """The RFC 5987 `filename*` of a Content-Disposition header, decoded."""
  from urllib.parse import unquote  # noqa: PLC0415

  value = header.split("filename*=", 1)[1].split(";")[0].strip()
  charset, _, encoded = value.split("'", 2)
  assert charset.upper() == "UTF-8"
  return unquote(encoded, encoding="utf-8")


@pytest.mark.parametrize("upload_name, stem", [
    ("żółw.jpg", "żółw"), ("猫の写真.png", "猫の写真"), ("🐢 turtle.png", "🐢 turtle")])
def test_any_upload_name_gives_a_valid_content_disposition(upload_name, stem, served):
  url, _ = served
  bg, fg_bg = photos.demo_pair(HEIGHT, WIDTH, seed=1)
  response = post_pair(url, bg, fg_bg, query="?format=mask", fg_bg_name=upload_name)
  assert response.status_code == 200, response.text
  header = response.headers["content-disposition"]
  assert header.isascii() and "\n" not in header and "\r" not in header
  assert filename_star(header) == f"{stem}_mask.png"
  # The plain `filename` is ASCII, its quotes and backslashes escaped: one quoted string.
  fallback = header.split("filename=", 1)[1].split("; filename*=")[0]
  assert fallback.startswith('"') and fallback.endswith('_mask.png"')
  inner = fallback[1:-1]
  assert '"' not in inner.replace('\\\\', "").replace('\\"', "")
  assert post_pair(url, bg, fg_bg, fg_bg_name=upload_name).json()["name"] == stem


def test_content_disposition_ascii_fallback():
  header = server.content_disposition("żółw_mask.png")
  assert header == ("inline; filename=\"zow_mask.png\"; "
                    "filename*=UTF-8''%C5%BC%C3%B3%C5%82w_mask.png")
  assert server.content_disposition("猫.png").startswith('inline; filename="image.png"; ')
  assert server.content_disposition("猫").startswith('inline; filename="image.png"; ')
  assert server.content_disposition("kitchen").startswith('inline; filename="kitchen"; ')
  header = server.content_disposition('say "cheese"\\\r\n.png')
  assert header.startswith('inline; filename="say \\"cheese\\"\\\\.png"; filename*=')
  assert filename_star(header) == 'say "cheese"\\\r\n.png'


def test_health_names_the_model_and_limits(served, workdir):
  url, _ = served
  response = requests.get(f"{url}/health", timeout=30)
  health = response.json()
  assert response.status_code == 200
  assert (health["status"], health["ready"], health["worker_alive"]) == ("ready", True, True)
  assert (health["model"], health["step"], health["fit"], health["clean_mask"]) == (
      "depthmasknet_v2", 0, "auto", True)
  assert health["run"] == os.path.basename(workdir)
  assert health["device"] == progress.describe_devices(jax.devices())
  assert health["limits"]["max_pixels"] == MAX_PIXELS
  assert health["limits"]["max_upload_bytes"] == MAX_UPLOAD_BYTES


BG, FG_BG = photos.demo_pair(HEIGHT, WIDTH, seed=2)


def png_header(width, height) -> bytes:
  """A PNG with no pixel data: refused on its size alone, or it would fail to decode."""
  def chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

  header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB.
  return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


# PostScript that Ghostscript would run for ever, were it given it (Pillow's EPS plugin would).
ENDLESS_EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 48 40\n{ } loop\n%%EOF\n"


def too_many_bytes():
  return {"bg": ("bg.png", bytes(MAX_UPLOAD_BYTES), "image/png"), "fg_bg": png(FG_BG)}


@pytest.mark.parametrize("problem, send, status, words", [
    ("sizes differ", lambda: {"bg": png(BG), "fg_bg": png(FG_BG[:-4])}, 422,
     ["bg is 48×40", "fg_bg is 48×36"]),
    ("not an image", lambda: {"bg": png(BG), "fg_bg": b"GIF89a, or so it says"}, 422,
     ["fg_bg (fg_bg.png): cannot read it as an image (it is not a PNG, JPEG, WebP, TIFF, BMP, "
      "GIF"]),
    ("PostScript", lambda: {"bg": png(BG), "fg_bg": ENDLESS_EPS}, 422,
     ["fg_bg (fg_bg.png): cannot read it as an image (a PostScript/EPS file; only PNG, JPEG"]),
    ("truncated image", lambda: {"bg": png(BG), "fg_bg": png(FG_BG)[:300]}, 422,
     ["fg_bg (fg_bg.png): cannot read it as an image ("]),
    ("bad new background", lambda: {"bg": png(BG), "fg_bg": png(FG_BG),
                                    "replace_bg": b"%PDF-1.7"}, 422,
     ["replace_bg (replace_bg.png): cannot read it as an image (a PDF"]),
    ("too many bytes", too_many_bytes, 413, ["upload too large", "0.2 MiB"]),
    ("too many pixels", lambda: {"bg": png(np.zeros((65, 64, 3), np.uint8)),
                                 "fg_bg": png(np.zeros((65, 64, 3), np.uint8))}, 413,
     ["bg (bg.png)", "64×65 is 4,160 pixels", "at most 4,096"]),
    # A bomb under Pillow's own guard (179 MP) must meet the server's pixel check: the header
    # alone is refused, the pixels it promises are never decoded (there are none to decode).
    ("bomb under Pillow's guard", lambda: {"bg": png_header(8_000, 6_000), "fg_bg": png(FG_BG)},
     413, ["bg (bg.png): 8000×6000 is 48,000,000 pixels; at most 4,096 per photo"]),
    ("bomb over Pillow's guard", lambda: {"bg": png_header(20_000, 20_000), "fg_bg": png(FG_BG)},
     413, ["bg (bg.png): over Pillow's decompression-bomb limit of 178,956,970 pixels"]),
    ("missing field", lambda: {"bg": png(BG)}, 400, ["missing the file 'fg_bg'"]),
    ("text field", lambda: {"bg": png(BG), "fg_bg": None}, 400, ["'fg_bg' is a text field"]),
    ("not multipart", lambda: None, 400, ["multipart/form-data"]),
    ("unknown format", lambda: {"bg": png(BG), "fg_bg": png(FG_BG)}, 400, ["format='jpeg'"]),
])
def test_bad_input_is_a_4xx_with_a_one_line_reason(problem, send, status, words, served):
  url, _ = served
  parts = send()
  if parts is None:
    response = requests.post(f"{url}/predict", data=b"bg=1", timeout=30,
                             headers={"Content-Type": "application/x-www-form-urlencoded"})
  else:
    files = {k: (f"{k}.png", v, "image/png") if isinstance(v, bytes) else v
             for k, v in parts.items() if v is not None}
    data = {k: "some text" for k, v in parts.items() if v is None}
    query = "?format=jpeg" if problem == "unknown format" else ""
    response = requests.post(f"{url}/predict{query}", files=files, data=data, timeout=30)
  assert response.status_code == status, response.text
  reason = response.json()["error"]
  assert "\n" not in reason
  for word in words:
    assert word in reason
  # The server keeps serving.
  good = post_pair(url, BG, FG_BG, query="?format=mask")
  assert good.status_code == 200


def wait_until(condition, what: str, timeout_s: float = 120.0) -> None:
  deadline = time.monotonic() + timeout_s
  while not condition():
    assert time.monotonic() < deadline, f"waited {timeout_s} s for {what}"
    time.sleep(0.01)


def burst(url, worker, pairs) -> list:
  """Posts every pair at once, all held at the model worker until the last arrived: one round
  takes them all, whatever the clients' timing."""
  received = worker.stats()["received"]
  with concurrent.futures.ThreadPoolExecutor(len(pairs)) as pool:
    with worker.paused():
      futures = [pool.submit(post_pair, url, *pair, query="?format=mask") for pair in pairs]
      wait_until(lambda: worker.stats()["received"] - received == len(pairs),
                 "every request to reach the model worker")
    return [future.result() for future in futures]


def test_concurrent_requests_share_model_calls_and_compiled_programs(served, predictor):
  url, app = served
  worker = app.state.worker
  sizes = [(32, 56), (24, 40), (56, 24)]  # Sizes no other test uses.
  pairs = [photos.demo_pair(*sizes[i % len(sizes)], seed=i) for i in range(21)]
  before = worker.stats()
  responses = burst(url, worker, pairs)
  after = worker.stats()
  assert [r.status_code for r in responses] == [200] * len(pairs)
  # Each client got its own pair's mask, though the pairs ran in shared batches.
  for (bg, fg_bg), response in zip(pairs, responses, strict=True):
    expected = np.round(predictor(bg, fg_bg).mask * 255)
    assert np.abs(decode(response.content, False)[1] - expected).max() <= 1
  # One round: per size, 7 pairs in batches of 4 + 2 + 1 (`split_batches`), not 7 calls.
  calls = sum(len(server.split_batches(7, worker.batch_limit(*size))) for size in sizes)
  assert after["model_calls"] - before["model_calls"] == calls == 9
  assert after["pairs"] - before["pairs"] == len(pairs)
  assert after["held_pixels"] == 0  # Every answered pair gave its pixels back.
  # The same burst again compiles nothing: every request used a program compiled once, for
  # its (size, batch), whichever client came first.
  with counting_lowerings() as lowered:
    responses = burst(url, worker, pairs)
  assert [r.status_code for r in responses] == [200] * len(pairs)
  assert lowered == []


def test_the_worker_refuses_past_its_queue_and_skips_cancelled_requests(predictor):
  worker = server.ModelWorker(predictor, max_queue=2)
  pair = photos.demo_pair(HEIGHT, WIDTH, seed=1)
  cancelled, waiting = worker.submit(*pair), worker.submit(*pair)
  with pytest.raises(server.Busy) as refusal:
    worker.submit(*pair)
  assert refusal.value.status == 503 and "2 pairs are waiting" in str(refusal.value)
  assert refusal.value.headers == {"Retry-After": str(server.RETRY_AFTER_S)}
  by_pixels = server.ModelWorker(predictor, max_waiting_pixels=HEIGHT * WIDTH + 1)
  by_pixels.submit(*pair)  # One pair is taken whatever its size; a second would pass the bound.
  with pytest.raises(server.Busy):
    by_pixels.submit(*pair)
  assert cancelled.cancel()
  worker.start()
  try:
    prediction = waiting.result(timeout=120)
  finally:
    worker.stop()
  np.testing.assert_array_equal(prediction.mask, predictor(*pair).mask)
  assert worker.stats()["pairs"] == 1


def test_a_pairs_pixels_are_held_until_its_answer_is_released(predictor):
  pair = photos.demo_pair(HEIGHT, WIDTH, seed=1)
  worker = server.ModelWorker(predictor, max_waiting_pixels=HEIGHT * WIDTH + 1)
  worker.start()
  try:
    first = worker.submit(*pair)
    first.result(timeout=120)  # Predicted, out of the queue, but its answer not yet made.
    assert worker.stats()["waiting"] == 0
    with pytest.raises(server.Busy, match="megapixels of photos are in hand"):
      worker.submit(*pair)
    worker.release(first)
    worker.release(first)  # Once only.
    assert worker.stats()["held_pixels"] == 0
    second = worker.submit(*pair)
    second.result(timeout=120)
    worker.release(second)
  finally:
    worker.stop()


def test_a_full_server_refuses_before_decoding(predictor, monkeypatch):
  decoded = []
  to_rgb = photos.to_rgb
  monkeypatch.setattr(photos, "to_rgb", lambda image, what: decoded.append(what) or
                      to_rgb(image, what))
  with serving(predictor, max_waiting_pixels=HEIGHT * WIDTH) as (url, app):
    held = app.state.worker.submit(BG, FG_BG)  # Its answer not yet made: its pixels in hand.
    held.result(timeout=120)
    response = post_pair(url, BG, FG_BG, query="?format=mask")
    assert response.status_code == 503 and "retry-after" in response.headers
    assert "megapixels of photos are in hand" in response.json()["error"]
    assert decoded == []  # Refused from bg's header: no photo of it was decoded.
    app.state.worker.release(held)
    assert post_pair(url, BG, FG_BG, query="?format=mask").status_code == 200


def test_outputs_made_in_strips_equal_the_whole():
  """The server makes its outputs a few rows at a time (bounded memory at 16 MP): the same
  arrays as the predict tool's functions on the whole photo."""
  rng = np.random.default_rng(0)
  height, width = 2 * server.OUTPUT_ROWS + 37, 9
  fg_bg = rng.integers(0, 256, (height, width, 3), np.uint8)
  new_bg = rng.integers(0, 256, (50, 20, 3), np.uint8)
  prediction = photos.Prediction(*rng.random((2, height, width), np.float32))
  made = server.output_images(fg_bg, prediction, server.PNG_KINDS, new_bg)
  whole = {**photos.output_images(prediction),
           "overlay": photos.overlay_picture(fg_bg, fg_bg, prediction, gap=0)[
               :, 2 * width:3 * width],
           "cutout": outputs.cutout_rgba(fg_bg, prediction.mask),
           "replace_bg": outputs.replace_background(fg_bg, prediction.mask, new_bg)}
  assert made.keys() == whole.keys()
  for kind, image in whole.items():
    assert made[kind].dtype == image.dtype, kind
    np.testing.assert_array_equal(made[kind], image, err_msg=kind)


def test_the_json_answer_is_streamed_whole():
  pngs = {"mask": b"", "depth": bytes(range(256)) * 12_289, "cutout": b"\x89PNG" * 7}
  assert len(pngs["depth"]) > 3 * 2**20  # More than one piece.
  fields = {"name": "żółw \"1\"", "width": 3}
  pieces, length = server.json_answer(fields, dict(pngs))
  body = b"".join(pieces)
  assert len(body) == length
  assert json.loads(body) == {**fields, **{kind: base64.b64encode(data).decode()
                                          for kind, data in pngs.items()}}


def test_batches_have_few_sizes():
  assert server.split_batches(20, 8) == [8, 8, 4]
  assert server.split_batches(7, 8) == [4, 2, 1]
  assert server.split_batches(13, 6) == [6, 6, 1]
  assert server.split_batches(1, 8) == [1]
  for limit in (1, 3, 8):
    sizes = {s for count in range(1, 40) for s in server.split_batches(count, limit)}
    assert all(sum(server.split_batches(c, limit)) == c for c in range(1, 40))
    assert sizes <= {limit} | {1 << k for k in range(limit.bit_length())}


def test_a_postscript_upload_never_reaches_pillows_eps_plugin(served, monkeypatch):
  """Pillow's EPS plugin renders through Ghostscript, a subprocess without a timeout: this
  file's endless loop would hang a thread for ever. The plugin must not even be tried."""
  from PIL import EpsImagePlugin  # noqa: PLC0415

  tried = []

  def refuse(self):
    tried.append(True)
    raise SyntaxError("the EPS plugin was tried (blocked by the test)")

  monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "_open", refuse)
  url, _ = served
  response = post_pair(url, BG, ENDLESS_EPS, fg_bg_name="drawing.eps")
  assert response.status_code == 422
  assert "fg_bg (drawing.eps): cannot read it as an image (a PostScript/EPS file" in \
      response.json()["error"]
  assert tried == []


def request_head(url: str, headers: dict, target: str = "/predict") -> bytes:
  netloc = url.split("://", 1)[1]
  lines = [f"POST {target} HTTP/1.1", f"Host: {netloc}",
           *(f"{name}: {value}" for name, value in headers.items())]
  return ("\r\n".join(lines) + "\r\n\r\n").encode()


def read_response(sock: socket.socket) -> tuple[int, dict, bytes]:
  """(status, headers, body) of one HTTP/1.1 response."""
  data = b""
  while b"\r\n\r\n" not in data:
    chunk = sock.recv(65536)
    assert chunk, f"the server closed the connection without answering: {data!r}"
    data += chunk
  head, _, body = data.partition(b"\r\n\r\n")
  status_line, *lines = head.decode("latin-1").split("\r\n")
  headers = {name.strip().lower(): value.strip()
             for name, value in (line.split(":", 1) for line in lines)}
  while len(body) < int(headers.get("content-length", 0)):
    chunk = sock.recv(65536)
    if not chunk:
      break
    body += chunk
  return int(status_line.split()[1]), headers, body


@contextlib.contextmanager
def connection(url: str, timeout_s: float = 30.0):
  """A raw socket to the server: a request the test sends as slowly, or as partly, as it
  likes. Waiting past `timeout_s` for an answer fails the test."""
  host, port = url.split("://", 1)[1].rsplit(":", 1)
  with socket.create_connection((host, int(port)), timeout=timeout_s) as sock:
    yield sock


MULTIPART = "multipart/form-data; boundary=xyz"
# The start of a multipart body: the file `bg` begins, and its bytes follow.
BODY_START = (b'--xyz\r\nContent-Disposition: form-data; name="bg"; filename="bg.png"\r\n'
              b"Content-Type: image/png\r\n\r\n")


def chunk(data: bytes) -> bytes:
  return b"%x\r\n" % len(data) + data + b"\r\n"


def test_a_declared_body_over_the_limit_is_refused_before_it_is_read(served):
  url, _ = served
  with connection(url) as sock:
    # Just over the limit, and not one byte of the body sent: the answer comes anyway.
    sock.sendall(request_head(url, {"Content-Type": MULTIPART,
                                    "Content-Length": MAX_UPLOAD_BYTES + 1}))
    status, _, body = read_response(sock)
  assert status == 413
  assert "upload too large: this server takes at most 0.2 MiB" in body.decode()


def test_a_chunked_body_is_cut_off_at_the_limit(served):
  url, _ = served
  with connection(url) as sock:
    sock.sendall(request_head(url, {"Content-Type": MULTIPART, "Transfer-Encoding": "chunked"}))
    sock.sendall(chunk(BODY_START))
    for _ in range(MAX_UPLOAD_BYTES // 50_000 + 1):  # Past the limit; the body never ends.
      sock.sendall(chunk(bytes(50_000)))
    status, _, body = read_response(sock)
  assert status == 413 and "upload too large" in body.decode()


def test_a_slow_sender_is_dropped(predictor):
  with serving(predictor, read_timeout_s=1.0) as (url, _), connection(url) as sock:
    sock.sendall(request_head(url, {"Content-Type": MULTIPART, "Content-Length": 100_000}))
    sock.sendall(BODY_START)  # And nothing more.
    status, headers, body = read_response(sock)
    assert status == 408 and headers["connection"] == "close"
    assert "the upload did not arrive within 1 s" in body.decode()
    assert sock.recv(1) == b""  # Closed: the slow sender holds nothing.


def test_at_most_max_reading_requests_are_read_at_once(predictor):
  with serving(predictor, max_reading=1, admission_timeout_s=0.5) as (url, _):
    reading = lambda: requests.get(f"{url}/health", timeout=30).json()["served"]["reading"]
    with connection(url) as sock:
      # A request that holds the one reading slot: its body is slow to come.
      sock.sendall(request_head(url, {"Content-Type": MULTIPART, "Content-Length": 100_000}))
      sock.sendall(BODY_START)
      wait_until(lambda: reading() == 1, "the slow request to take the slot")
      response = post_pair(url, BG, FG_BG, query="?format=mask")
      assert response.status_code == 503
      assert response.headers["retry-after"] == str(server.RETRY_AFTER_S)
      assert "1 requests are being read" in response.json()["error"]
    # Once its client is gone, the slot is free again.
    wait_until(lambda: reading() == 0, "the slot to be released")
    assert post_pair(url, BG, FG_BG, query="?format=mask").status_code == 200


def test_at_most_max_decoding_requests_decode_at_once(predictor, monkeypatch):
  decoding, most, lock = [0], [0], threading.Lock()
  decode = server.decode_photo

  def watched(*args):
    with lock:
      decoding[0] += 1
      most[0] = max(most[0], decoding[0])
    try:
      time.sleep(0.05)  # Long enough for the others to pile up, were they let through.
      return decode(*args)
    finally:
      with lock:
        decoding[0] -= 1

  monkeypatch.setattr(server, "decode_photo", watched)
  with serving(predictor, max_reading=6, max_decoding=1) as (url, _):
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
      responses = list(pool.map(lambda _: post_pair(url, BG, FG_BG, query="?format=mask"),
                                range(6)))
  assert [r.status_code for r in responses] == [200] * 6
  assert most[0] == 1


def test_requests_for_another_host_or_from_another_site_are_refused(served):
  url, app = served
  port = url.rsplit(":", 1)[1]
  pairs_before = app.state.worker.stats()["pairs"]
  for host in ("evil.example", f"evil.example:{port}", f"127.0.0.1.evil.example:{port}"):
    for method, path in (("GET", "/health"), ("GET", "/"), ("POST", "/predict")):
      response = requests.request(method, f"{url}{path}", headers={"Host": host}, timeout=30)
      assert response.status_code == 421, (host, path)
      assert "is not a name this server answers to" in response.json()["error"]
  for origin in ("http://evil.example", f"http://evil.example:{port}", "null",
                 f"http://localhost:{port}"):  # Another origin than the URL's own (127.0.0.1).
    response = post_pair(url, BG, FG_BG, headers={"Origin": origin})
    assert response.status_code == 403, origin
    assert "refused a request from the page of" in response.json()["error"]
  assert app.state.worker.stats()["pairs"] == pairs_before  # The model never ran for them.
  # Its own names, its own page, and clients that send no Origin.
  for host, origin in ((f"127.0.0.1:{port}", f"http://127.0.0.1:{port}"),
                       (f"localhost:{port}", f"http://localhost:{port}"),
                       (f"{LAN_NAME}:{port}", f"http://{LAN_NAME}:{port}"),
                       (f"{LAN_NAME.upper()}:{port}", None)):
    headers = {"Host": host, **({"Origin": origin} if origin else {})}
    assert post_pair(url, BG, FG_BG, query="?format=mask", headers=headers).status_code == 200


def test_allowed_hosts():
  assert server.allowed_hosts() == {"127.0.0.1", "localhost", "::1"}
  assert server.allowed_hosts("0.0.0.0", ["Photos.LAN", " "]) == {"127.0.0.1", "localhost",
                                                                  "::1", "photos.lan"}
  assert "192.168.1.5" in server.allowed_hosts("192.168.1.5")
  hosts = server.allowed_hosts("::1")
  refusal = lambda headers: server.cross_site_refusal(server.Headers(headers), hosts)
  assert refusal({"host": "[::1]:8000"}) is None
  assert refusal({"host": "[::1]:8000", "origin": "http://[::1]:8000"}) is None
  assert refusal({}).status == 421  # No Host at all (HTTP/1.0).
  assert refusal({"host": "localhost:8000", "origin": "ftp://localhost:8000"}).status == 403
  assert server.cross_site_refusal(server.Headers({"host": "anything"}),
                                   server.allowed_hosts(extra=["*"])) is None


def test_health_says_when_the_model_thread_stopped(predictor):
  with serving(predictor) as (url, app):
    app.state.worker.stop()  # As if it had died.
    response = requests.get(f"{url}/health", timeout=30)
    health = response.json()
    assert response.status_code == 503
    assert (health["status"], health["ready"], health["worker_alive"]) == ("stopped", False,
                                                                          False)
    # A request is refused at once, not left waiting for a thread that is gone.
    response = post_pair(url, BG, FG_BG, query="?format=mask")
    assert response.status_code == 503 and "retry-after" in response.headers
    assert "the model thread has stopped" in response.json()["error"]


def test_not_ready_until_warmed_up(predictor):
  release, started = threading.Event(), threading.Event()

  def warm_up():
    started.set()
    assert release.wait(120)

  with serving(predictor, warm_up=warm_up) as (url, app):
    assert started.wait(60)
    response = requests.get(f"{url}/health", timeout=30)
    assert response.status_code == 503
    assert (response.json()["status"], response.json()["ready"],
            response.json()["worker_alive"]) == ("warming up", False, True)
    response = post_pair(url, BG, FG_BG, query="?format=mask")
    assert response.status_code == 503 and "retry-after" in response.headers
    assert "warming up" in response.json()["error"]
    release.set()
    wait_until(lambda: requests.get(f"{url}/health", timeout=30).status_code == 200,
               "the server to be ready")
    assert app.state.worker.stats()["warm_up_s"] is not None
    assert post_pair(url, BG, FG_BG, query="?format=mask").status_code == 200


def command_flags(*argv) -> flags.FlagValues:
  values = flags.FlagValues()
  serve.define_flags(values, [])
  values(["dmjax-serve", *argv])
  return values


@pytest.fixture
def restored_compilation_cache():
  """jax's compilation cache setting, put back after a test that changes it."""
  saved = jax.config.jax_compilation_cache_dir
  yield
  jax.config.update("jax_compilation_cache_dir", saved)


def test_warmed_up_no_photo_size_compiles(workdir, restored_compilation_cache):
  """`serve --warm_up`: ready once the model's working sizes are compiled, after which photos
  of sizes never seen compile nothing (no stall for the other clients)."""
  app = serve.make_app(command_flags(f"--workdir={workdir}", "--warm_up", "--batch_size=1"))
  with server.running_server(app) as url:
    wait_until(lambda: requests.get(f"{url}/health", timeout=30).status_code == 200,
               "the server to be ready", timeout_s=600)
    assert app.state.worker.stats()["warm_up_s"] > 0
    before = compilations.count()
    for height, width in ((37, 53), (61, 29), (44, 44)):
      bg, fg_bg = photos.demo_pair(height, width, seed=height)
      assert post_pair(url, bg, fg_bg, query="?format=mask").status_code == 200
    assert compilations.count().programs == before.programs


def test_serve_an_exported_file(workdir, tmp_path, restored_compilation_cache):
  path = str(tmp_path / "tiny.jaxexport")
  exported.save(exported.export_run(workdir, platforms=("cpu",)), path)
  app = serve.make_app(command_flags(f"--exported={path}", "--port=0"))
  with server.running_server(app) as url:
    health = requests.get(f"{url}/health", timeout=30).json()
    assert (health["model"], health["run"], health["step"]) == ("depthmasknet_v2",
                                                                "tiny.jaxexport", 0)
    response = post_pair(url, BG, FG_BG, query="?format=depth")
    assert response.status_code == 200
    assert decode(response.content, False)[1].shape == (HEIGHT, WIDTH)
  message = run_command(serve.main, f"--exported={path}", f"--workdir={workdir}")
  assert "Exactly one of (workdir, exported)" in message and "\n" not in message
  message = run_command(serve.main, f"--exported={path}", "--step=3", "--port=0")
  assert message == "error: --step is for --workdir; an exported file holds one checkpoint"


def test_the_compilation_cache_is_on_unless_turned_off(workdir, monkeypatch, tmp_path,
                                                        restored_compilation_cache):
  monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
  serve.make_app(command_flags(f"--workdir={workdir}"))
  assert jax.config.jax_compilation_cache_dir == str(tmp_path / "cache" / "dmjax" / "jax")
  serve.make_app(command_flags(f"--workdir={workdir}", "--nocompilation_cache"))
  assert jax.config.jax_compilation_cache_dir is None
  monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "chosen"))
  assert cli.use_compilation_cache() == str(tmp_path / "chosen")


def test_measure_served_requests(predictor):
  figures = server.measure_served_requests(predictor, size=32, concurrency=3, seconds=1.0)
  assert figures["requests"] >= 3
  assert figures["requests_per_s"] == pytest.approx(figures["requests"] / figures["seconds"],
                                                    rel=0.01)
  assert 0 < figures["latency_median_s"] <= figures["latency_p90_s"]
  assert figures["model_calls"] >= 1 and 1 <= figures["pairs_per_model_call"] <= 3


def browser(temporary_dir):
  """Headless Debian chromium under selenium, through Debian's chromedriver (no downloads); its
  temporary files go to `temporary_dir`, which must have a short path: chromium puts unix
  sockets there, whose paths may not exceed 107 bytes (pytest-xdist's tmp_path can)."""
  from selenium import webdriver
  from selenium.webdriver.chrome.service import Service

  chromium, chromedriver = shutil.which("chromium"), shutil.which("chromedriver")
  if not (chromium and chromedriver):
    if os.environ.get("CI"):
      pytest.fail("chromium or chromedriver is missing; .ci/run installs them")
    pytest.skip("needs Debian's chromium and chromium-driver (apt-get install chromium "
                "chromium-driver)")
  options = webdriver.ChromeOptions()
  options.binary_location = chromium
  for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                   "--window-size=1100,760", "--force-device-scale-factor=1"):
    options.add_argument(argument)
  # Not under the allocator the tests preload for themselves (dmjax.allocator): chromium's
  # zygote dies under a preloaded mimalloc.
  environment = {name: value for name, value in os.environ.items() if name != "LD_PRELOAD"}
  service = Service(chromedriver, env=dict(environment, TMPDIR=str(temporary_dir)))
  return webdriver.Chrome(options=options, service=service)


def test_the_page_in_a_headless_browser(served, tmp_path):
  """Upload a pair (and two wrong files first), see the three results, take a screenshot."""
  url, _ = served
  bg, fg_bg = photos.demo_pair(HEIGHT, WIDTH, seed=3)
  paths = {}
  for name, data in (("bg.png", png(bg)), ("fg_bg.png", png(fg_bg)), ("beach.png", png(NEW_BG)),
                     ("notes.png", b"not a picture"), ("notes.txt", b"not a picture")):
    paths[name] = tmp_path / name
    paths[name].write_bytes(data)
  with tempfile.TemporaryDirectory(prefix="chromium") as browser_files:
    driver = browser(browser_files)
    try:
      _drive_the_page(driver, url, paths, tmp_path)
    finally:
      driver.quit()


def _drive_the_page(driver, url: str, paths: dict, tmp_path) -> None:
  from selenium.webdriver.common.by import By
  from selenium.webdriver.support.ui import WebDriverWait

  driver.get(url + "/")
  wait = WebDriverWait(driver, 60)
  wait.until(lambda d: "checkpoint step 0" in d.find_element(By.ID, "model").text)
  driver.find_element(By.ID, "bg").send_keys(str(paths["bg.png"]))
  # A file the browser knows is no image is refused before uploading ...
  driver.find_element(By.ID, "fg_bg").send_keys(str(paths["notes.txt"]))
  message = wait.until(lambda d: d.find_element(By.ID, "message").text)
  assert message == "fg_bg: notes.txt is not an image (text/plain)"
  assert not driver.find_element(By.ID, "run").is_enabled()
  # ... one that only looks like one, by the server.
  driver.find_element(By.ID, "fg_bg").send_keys(str(paths["notes.png"]))
  wait.until(lambda d: d.find_element(By.ID, "run").is_enabled())
  driver.find_element(By.ID, "run").click()
  message = wait.until(lambda d: "cannot" in d.find_element(By.ID, "message").text
                       and d.find_element(By.ID, "message").text)
  assert "fg_bg (notes.png): cannot read it as an image" in message
  assert not driver.find_element(By.ID, "results").is_displayed()

  driver.find_element(By.ID, "fg_bg").send_keys(str(paths["fg_bg.png"]))
  wait.until(lambda d: d.find_element(By.ID, "run").is_enabled())
  driver.find_element(By.ID, "run").click()
  wait.until(lambda d: d.find_element(By.ID, "results").is_displayed())
  # Without a third photo: no new background.
  assert not driver.find_element(By.ID, "replace_bg-figure").is_displayed()
  assert driver.find_element(By.ID, "cutout").is_displayed()

  # With one: the object over it, beside the cut-out.
  driver.find_element(By.ID, "replace_bg").send_keys(str(paths["beach.png"]))
  driver.find_element(By.ID, "run").click()
  wait.until(lambda d: d.find_element(By.ID, "replace_bg-figure").is_displayed())
  for kind, element in (("mask", "mask"), ("depth_color", "depth_color"),
                        ("overlay", "overlay"), ("cutout", "cutout"),
                        ("replace_bg", "replace_bg-result")):
    image = driver.find_element(By.ID, element)
    size = driver.execute_script("return [arguments[0].naturalWidth, arguments[0].naturalHeight,"
                                 " arguments[0].complete]", image)
    assert size == [WIDTH, HEIGHT, True], kind
    assert image.is_displayed()
    link = driver.find_element(By.ID, f"{kind}-link")
    assert link.get_attribute("download") == f"fg_bg_{kind}.png"
  cutout = driver.find_element(By.ID, "cutout-link").get_attribute("href")
  with Image.open(io.BytesIO(base64.b64decode(cutout.split(",", 1)[1]))) as image:
    assert image.mode == "RGBA" and image.size == (WIDTH, HEIGHT)
  assert driver.find_element(By.ID, "depth-link").get_attribute("href").startswith(
      "data:image/png;base64,")
  assert not driver.find_element(By.ID, "message").is_displayed()
  screenshot = tmp_path / "page.png"  # Kept with the test's files, to look at.
  assert driver.save_screenshot(str(screenshot))
  viewport = driver.execute_script("return [window.innerWidth, window.innerHeight]")
  with Image.open(screenshot) as image:
    assert list(image.size) == viewport
    # Photos and text on screen, not a blank frame.
    pixels = np.asarray(image.convert("RGB")).reshape(-1, 3).astype(int)
    assert len(np.unique(pixels, axis=0)) > 200


@pytest.mark.slow
def test_measure_upload_memory(workdir):
  figures = server.measure_upload_memory(workdir, clients=3, height=120, width=160,
                                         flags=["--max_upload_mb=0.2"])
  assert figures["statuses"] == {200: 3} and figures["photo"] == "160×120"
  # Photos as large in bytes as the limit allows: 3 bytes a pixel, under 0.2 MiB in all.
  assert 100_000 < figures["request_bytes"] < 0.2 * 2**20
  assert 0 < figures["baseline_mb"] <= figures["peak_mb"]
  assert figures["peak_over_baseline_mb"] == figures["peak_mb"] - figures["baseline_mb"]


def free_port() -> int:
  with server.loopback_socket() as sock:
    return sock.getsockname()[1]


def test_a_taken_port_is_a_one_line_error(workdir):
  with server.loopback_socket() as sock:
    port = sock.getsockname()[1]
    sock.listen()
    with pytest.raises(SystemExit) as exit_info:
      serve.main([f"--workdir={workdir}", f"--port={port}"])
  assert str(exit_info.value.code).startswith(f"error: cannot listen on 127.0.0.1:{port}")


@pytest.mark.slow
def test_the_command_serves_until_stopped(workdir):
  port = free_port()
  process = subprocess.Popen(
      [sys.executable, "-m", "dmjax.serve", f"--workdir={workdir}", f"--port={port}"],
      cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
      env=dict(os.environ, JAX_PLATFORMS="cpu"))
  try:
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 240
    while True:
      assert process.poll() is None, process.communicate()[1][-3000:]
      try:
        health = requests.get(f"{url}/health", timeout=5).json()
        break
      except requests.ConnectionError:
        assert time.monotonic() < deadline, "the server did not start in 240 s"
        time.sleep(0.5)
    assert health["step"] == 0
    bg, fg_bg = photos.demo_pair(HEIGHT, WIDTH, seed=4)
    response = post_pair(url, bg, fg_bg, query="?format=depth")
    assert response.status_code == 200
    assert decode(response.content, False)[1].shape == (HEIGHT, WIDTH)
  finally:
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=60)
  assert process.returncode == 0, stderr[-3000:]
  assert (f"depthmasknet_v2 at checkpoint step 0 ({os.path.basename(workdir)}): open "
          f"http://127.0.0.1:{port}/") in stdout
  assert "runs on 1 CPU device" in stderr
