"""The web app and HTTP API (dmjax.serve, dmjax.inference.server) over real loopback HTTP: good
pairs, refusals, concurrent clients sharing the model, the page in headless chromium, the
command."""

import base64
import concurrent.futures
import contextlib
import importlib.util
import io
import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import zlib

import jax
import numpy as np
import pytest
import requests
from conftest import REPO
from PIL import Image

# The `serve` extra; CI installs it, so there a missing one fails instead of skipping.
_MISSING = [m for m in ("starlette", "uvicorn", "multipart") if importlib.util.find_spec(m) is None]
if _MISSING and not os.environ.get("CI"):
  pytest.skip(f"needs the serve extra (missing {_MISSING}): pip install -e \".[serve]\"",
              allow_module_level=True)

from dmjax import progress, serve  # noqa: E402
from dmjax.inference import Predictor, photos, server  # noqa: E402

HEIGHT, WIDTH = 40, 48
MAX_UPLOAD_BYTES = 200_000
MAX_PIXELS = 64 * 64
# Long enough that a burst of requests from 20 threads lands in one round of the model worker.
BATCH_WAIT_S = 0.2
LOWERING_EVENT = "/jax/core/compile/jaxpr_to_mlir_module_duration"


@pytest.fixture(scope="module")
def workdir(untrained_workdir):
  return untrained_workdir


@pytest.fixture(scope="module")
def predictor(workdir):
  return Predictor.from_workdir(workdir)


@pytest.fixture(scope="module")
def served(predictor):
  """(base URL, app) of the app served by uvicorn in a thread of this process."""
  app = server.create_app(predictor, max_upload_bytes=MAX_UPLOAD_BYTES, max_pixels=MAX_PIXELS,
                          batch_wait_s=BATCH_WAIT_S)
  with server.running_server(app) as url:
    yield url, app


def png(array, mode=None) -> bytes:
  image = Image.fromarray(array)
  buffer = io.BytesIO()
  (image.convert(mode) if mode else image).save(buffer, format="PNG")
  return buffer.getvalue()


def post_pair(url, bg, fg_bg, query="", headers=None, bg_name="bg.png", fg_bg_name="fg_bg.png"):
  files = {"bg": (bg_name, bg if isinstance(bg, bytes) else png(bg), "image/png"),
           "fg_bg": (fg_bg_name, fg_bg if isinstance(fg_bg, bytes) else png(fg_bg), "image/png")}
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


def test_a_good_pair_gives_the_predict_tools_outputs(served, predictor):
  url, _ = served
  bg, fg_bg = photos.demo_pair(HEIGHT, WIDTH, seed=1)
  response = post_pair(url, bg, fg_bg, fg_bg_name="kitchen.jpg.png")
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


def test_one_png_by_format_or_accept(served):
  url, _ = served
  bg, fg_bg = photos.demo_pair(HEIGHT, WIDTH, seed=1)
  answer = post_pair(url, bg, fg_bg).json()
  for kind in server.PNG_KINDS:
    response = post_pair(url, bg, fg_bg, query=f"?format={kind}")
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    assert f'filename="fg_bg_{kind}.png"' in response.headers["content-disposition"]
    np.testing.assert_array_equal(decode(response.content, False)[1], decode(answer[kind])[1])
  response = post_pair(url, bg, fg_bg, headers={"Accept": "image/png"})
  assert response.headers["content-type"] == "image/png"
  np.testing.assert_array_equal(decode(response.content, False)[1], decode(answer["mask"])[1])


def test_health_names_the_model_and_limits(served, predictor):
  url, _ = served
  health = requests.get(f"{url}/health", timeout=30).json()
  assert health["status"] == "ok"
  assert (health["model"], health["step"], health["fit"], health["clean_mask"]) == (
      "depthmasknet_v2", 0, "auto", True)
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


def too_many_bytes():
  return {"bg": ("bg.png", bytes(MAX_UPLOAD_BYTES), "image/png"), "fg_bg": png(FG_BG)}


@pytest.mark.parametrize("problem, send, status, words", [
    ("sizes differ", lambda: {"bg": png(BG), "fg_bg": png(FG_BG[:-4])}, 422,
     ["bg is 48×40", "fg_bg is 48×36"]),
    ("not an image", lambda: {"bg": png(BG), "fg_bg": b"GIF89a, or so it says"}, 422,
     ["fg_bg (fg_bg.png): cannot read it as an image (not a format PIL knows)"]),
    ("truncated image", lambda: {"bg": png(BG), "fg_bg": png(FG_BG)[:300]}, 422,
     ["fg_bg (fg_bg.png): cannot read it as an image ("]),
    ("too many bytes", too_many_bytes, 413, ["upload too large", "0.2 MiB"]),
    ("too many pixels", lambda: {"bg": png(np.zeros((65, 64, 3), np.uint8)),
                                 "fg_bg": png(np.zeros((65, 64, 3), np.uint8))}, 413,
     ["bg (bg.png)", "64×65 is 4,160 pixels", "at most 4,096"]),
    ("decompression bomb", lambda: {"bg": png_header(20_000, 20_000), "fg_bg": png(FG_BG)}, 413,
     ["bg (bg.png): far more than 4,096 pixels"]),
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


def test_concurrent_requests_share_model_calls_and_compiled_programs(served, predictor):
  url, app = served
  height, width = 32, 56  # A size no other test uses: its programs compile here.
  pairs = [photos.demo_pair(height, width, seed=seed) for seed in range(20)]
  with counting_lowerings() as lowered:
    assert post_pair(url, *pairs[0], query="?format=mask").status_code == 200
  per_program = len(lowered)  # What one new (size, batch) costs: the model, resizes, ...
  assert per_program > 0
  before = app.state.worker.stats()
  with counting_lowerings() as lowered, concurrent.futures.ThreadPoolExecutor(20) as pool:
    responses = list(pool.map(lambda pair: post_pair(url, *pair, query="?format=mask"), pairs))
  after = app.state.worker.stats()

  assert [r.status_code for r in responses] == [200] * 20
  # Each client got its own pair's mask, though the pairs ran in shared batches.
  for (bg, fg_bg), response in zip(pairs, responses, strict=True):
    expected = np.round(predictor(bg, fg_bg).mask * 255)
    assert np.abs(decode(response.content, False)[1] - expected).max() <= 1
  calls = after["model_calls"] - before["model_calls"]
  assert after["pairs"] - before["pairs"] == 20
  # 20 pairs of one size: 8 + 8 + 4 in one round; a straggler in a second round adds a few.
  assert calls <= 6, after
  new_batch_sizes = {size for size, count in after["batch_sizes"].items()
                     if count > before["batch_sizes"].get(size, 0)} - {"1"}
  # Compiled once per batch size (1, 2, 4, 8), not once per request; plus, at most once more,
  # the object window's programs for a window side the first pair did not have (window sides
  # come from a grid: dmjax.inference.cascade.window_side).
  assert len(lowered) <= per_program * (len(new_batch_sizes) + 1), (len(lowered),
                                                                     new_batch_sizes)


def test_the_worker_refuses_past_its_queue_and_skips_cancelled_requests(predictor):
  worker = server.ModelWorker(predictor, max_queue=2)
  pair = photos.demo_pair(HEIGHT, WIDTH, seed=1)
  cancelled, waiting = worker.submit(*pair), worker.submit(*pair)
  with pytest.raises(server.Busy) as refusal:
    worker.submit(*pair)
  assert refusal.value.status == 503 and "2 pairs are waiting" in str(refusal.value)
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


def test_batches_have_few_sizes():
  assert server.split_batches(20, 8) == [8, 8, 4]
  assert server.split_batches(7, 8) == [4, 2, 1]
  assert server.split_batches(13, 6) == [6, 6, 1]
  assert server.split_batches(1, 8) == [1]
  for limit in (1, 3, 8):
    sizes = {s for count in range(1, 40) for s in server.split_batches(count, limit)}
    assert all(sum(server.split_batches(c, limit)) == c for c in range(1, 40))
    assert sizes <= {limit} | {1 << k for k in range(limit.bit_length())}


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
  service = Service(chromedriver, env=dict(os.environ, TMPDIR=str(temporary_dir)))
  return webdriver.Chrome(options=options, service=service)


def test_the_page_in_a_headless_browser(served, tmp_path):
  """Upload a pair (and two wrong files first), see the three results, take a screenshot."""
  url, _ = served
  bg, fg_bg = photos.demo_pair(HEIGHT, WIDTH, seed=3)
  paths = {}
  for name, data in (("bg.png", png(bg)), ("fg_bg.png", png(fg_bg)),
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
  for kind in ("mask", "depth_color", "overlay"):
    image = driver.find_element(By.ID, kind)
    size = driver.execute_script("return [arguments[0].naturalWidth, arguments[0].naturalHeight,"
                                 " arguments[0].complete]", image)
    assert size == [WIDTH, HEIGHT, True], kind
    assert image.is_displayed()
    link = driver.find_element(By.ID, f"{kind}-link")
    assert link.get_attribute("download") == f"fg_bg_{kind}.png"
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
  assert f"depthmasknet_v2 at checkpoint step 0: open http://127.0.0.1:{port}/" in stdout
  assert "runs on 1 CPU device" in stderr
