"""A trained model behind HTTP: a page at `/` and a JSON or PNG API, one worker for the model.

  app = server.create_app(Predictor.from_workdir("workdirs/r64"))
  uvicorn.run(app, host="127.0.0.1", port=8000)        # what `python -m dmjax.serve` does

Routes:
  GET  /          the page (static/index.html): pick two photos, see mask, depth and overlay
  GET  /health    JSON: model, checkpoint step, device, fit, limits and counters
  POST /predict   multipart/form-data with the files `bg` and `fg_bg` →
                    ?format=json (default): {"name", "width", "height", "step", "seconds",
                      "mask", "depth", "depth_color", "overlay"}, each image a base64 PNG
                    ?format=mask|depth|depth_color|overlay: that one PNG (image/png); so does
                      `Accept: image/png` without `format` (the mask)

The PNGs are those of `dmjax.predict` (`dmjax.inference.photos`): the mask 8-bit (probability ×
255), depth 16-bit (× 65535, 0 = nearest), depth colour-mapped; `overlay` is the mask tinted over
the composite (the third panel of the predict tool's NAME_overlay.png).

Bad input is refused with a 4xx and `{"error": "one line"}`: 400 a malformed request or missing
field, 413 too many bytes or pixels, 422 a file that is not an image or a pair of two sizes; 503
when the queue is full. Each refusal is the request's alone: the server keeps serving.

Only one thread calls the model (`ModelWorker`): requests wait in a bounded queue, and each round
takes every request waiting and splits those of one size into batches of a few sizes (the most
a call takes, else powers of two: 13 → 8 + 4 + 1), so concurrent clients share calls and compiled
programs (at most 1 + log2(batch_size) per photo size) instead of each compiling its own, and no
call computes padding.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import dataclasses
import io
import logging
import os
import queue
import socket
import statistics
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence

import jax
import numpy as np
import uvicorn
from PIL import Image, UnidentifiedImageError
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from dmjax import errors, files, progress
from dmjax.inference import photos
from dmjax.inference.predictor import Prediction, Predictor, image_size

PNG_KINDS = (*photos.OUTPUT_KINDS, "overlay")
FORMATS = ("json", *PNG_KINDS)
FIELDS = ("bg", "fg_bg")
PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static", "index.html")

DEFAULT_MAX_UPLOAD_BYTES = 40 * 2**20  # Both photos together: two 12-megapixel JPEGs fit.
DEFAULT_MAX_PIXELS = 16_000_000  # Per photo: 4,000 × 4,000 (time and memory grow with pixels).
DEFAULT_MAX_QUEUE = 64  # Pairs waiting for the model; beyond, 503.
# Pixels of the pairs waiting (their decoded photos take 6 bytes a pixel): beyond, 503.
DEFAULT_MAX_WAITING_PIXELS = 64_000_000
DEFAULT_MAX_BATCH_PIXELS = 8_000_000  # Pixels per model call: larger photos run one at a time.
_DRAIN_BYTES = 64 * 2**20  # Read and dropped past the upload limit before refusing (_read_body).

log = logging.getLogger(__name__)


class Refusal(Exception):
  """A request the server will not serve: an HTTP status and a one-line reason."""

  def __init__(self, status: int, reason: str):
    super().__init__(reason)
    self.status = status


class Busy(Refusal):
  def __init__(self, waiting: int):
    super().__init__(503, f"busy: {waiting} pairs are waiting for the model; try again shortly")


@dataclasses.dataclass
class _Job:
  bg: np.ndarray
  fg_bg: np.ndarray
  future: concurrent.futures.Future


def _pixels(job: _Job) -> int:
  return job.bg.shape[0] * job.bg.shape[1]


def split_batches(count: int, limit: int) -> list[int]:
  """Batch sizes for `count` pairs of one size, at most `limit` a call: `limit` while that many
  remain, then the largest powers of two (20, 8 → 8 8 4; 7, 8 → 4 2 1). Few distinct sizes, so
  few compiled programs, and no call runs padding."""
  sizes = []
  while count > 0:
    size = limit if count >= limit else 1 << (count.bit_length() - 1)
    sizes.append(size)
    count -= size
  return sizes


class ModelWorker:
  """The one thread that calls the model; `submit` a pair from any thread, get a Future.

  Each round waits `batch_wait_s` after the first pair arrives (so that a burst shares calls),
  takes every pair waiting, and runs those of one size in batches of at most
  `predictor.batch_size` pairs and `max_batch_pixels` pixels (`split_batches`).
  """

  def __init__(self, predictor: Predictor, *, max_queue: int = DEFAULT_MAX_QUEUE,
               max_waiting_pixels: int = DEFAULT_MAX_WAITING_PIXELS,
               max_batch_pixels: int = DEFAULT_MAX_BATCH_PIXELS, batch_wait_s: float = 0.005):
    self.predictor = predictor
    self.max_waiting_pixels = max_waiting_pixels
    self.max_batch_pixels = max_batch_pixels
    self.batch_wait_s = batch_wait_s
    self._queue: queue.Queue[_Job | None] = queue.Queue(maxsize=max_queue)
    self._thread: threading.Thread | None = None
    self._lock = threading.Lock()
    self._stats = {"pairs": 0, "model_calls": 0, "failed_calls": 0}
    self._waiting_pixels = 0
    self._batch_sizes: Counter[int] = Counter()  # Pairs in a call → calls.

  def start(self) -> None:
    if self._thread is None:
      self._thread = threading.Thread(target=self._loop, name="dmjax-model", daemon=True)
      self._thread.start()

  def stop(self) -> None:
    if self._thread is not None:
      self._queue.put(None)
      self._thread.join()
      self._thread = None

  def submit(self, bg: np.ndarray, fg_bg: np.ndarray) -> concurrent.futures.Future:
    """Queues one checked pair (uint8 RGB, one size); the Future gets its `Prediction`.
    Raises `Busy` when `max_queue` pairs or `max_waiting_pixels` (unless none) already wait."""
    job = _Job(bg, fg_bg, concurrent.futures.Future())
    with self._lock:
      if self._waiting_pixels and self._waiting_pixels + _pixels(job) > self.max_waiting_pixels:
        raise Busy(self._queue.qsize())
      try:
        self._queue.put_nowait(job)
      except queue.Full:
        raise Busy(self._queue.qsize()) from None
      self._waiting_pixels += _pixels(job)
    return job.future

  def stats(self) -> dict:
    with self._lock:
      return {**self._stats, "waiting": self._queue.qsize(),
              "batch_sizes": {str(k): v for k, v in sorted(self._batch_sizes.items())}}

  def _take(self, timeout: float | None = None) -> _Job | None:
    job = self._queue.get(timeout=timeout)
    if job is not None:
      with self._lock:
        self._waiting_pixels -= _pixels(job)
    return job

  def _loop(self) -> None:
    while True:
      job = self._take()
      if job is None:
        return
      jobs = [job]
      deadline = time.monotonic() + self.batch_wait_s
      stop = False
      while True:
        try:
          job = self._take(timeout=max(deadline - time.monotonic(), 0.0))
        except queue.Empty:
          break
        if job is None:
          stop = True
          break
        jobs.append(job)
      self._run_round(jobs)
      if stop:
        return

  def batch_limit(self, height: int, width: int) -> int:
    """The most pairs of this size one model call takes."""
    return max(1, min(self.predictor.batch_size, self.max_batch_pixels // (height * width)))

  def warm_up(self, height: int, width: int, max_waiting: int | None = None) -> float:
    """Compiles every batch shape pairs of this size can run as (when at most `max_waiting`
    wait at once); returns the seconds taken. Call before `start` (the model is the worker's
    once it runs)."""
    started = time.perf_counter()
    pair = photos.demo_pair(height, width)
    limit = self.batch_limit(height, width)
    counts = range(1, min(limit, max_waiting or limit) + 1)
    for size in sorted({s for count in counts for s in split_batches(count, limit)}):
      self.predictor.predict_pairs([pair] * size)
    return time.perf_counter() - started

  def _run_round(self, jobs: list[_Job]) -> None:
    by_shape: dict[tuple, list[_Job]] = {}
    # A request whose client went away may have cancelled its Future: skip it.
    for job in (job for job in jobs if job.future.set_running_or_notify_cancel()):
      by_shape.setdefault(job.bg.shape, []).append(job)
    for shape, same_size in by_shape.items():
      start = 0
      for size in split_batches(len(same_size), self.batch_limit(*shape[:2])):
        self._run_batch(same_size[start:start + size])
        start += size

  def _run_batch(self, jobs: list[_Job]) -> None:
    try:
      predictions = self.predictor.predict_pairs([(job.bg, job.fg_bg) for job in jobs])
    except Exception as e:  # The batch's requests fail; the worker goes on.
      if not isinstance(e, errors.UserError):
        log.exception("prediction failed for a batch of %d", len(jobs))
      refusal = (Refusal(422, str(e)) if isinstance(e, errors.UserError) else
                 Refusal(500, f"internal error: {type(e).__name__}: {e}".splitlines()[0]))
      with self._lock:
        self._stats["failed_calls"] += 1
      for job in jobs:
        job.future.set_exception(refusal)
      return
    with self._lock:
      self._stats["pairs"] += len(jobs)
      self._stats["model_calls"] += 1
      self._batch_sizes[len(jobs)] += 1
    for job, prediction in zip(jobs, predictions, strict=True):
      job.future.set_result(prediction)


def decode_photo(data: bytes, what: str, max_pixels: int) -> np.ndarray:
  """An uploaded file → uint8 RGB (H, W, 3), upright per EXIF, as `photos.read_image` reads
  files; refuses more than `max_pixels` before decoding the pixels."""
  try:
    with Image.open(io.BytesIO(data)) as image:
      width, height = image.size
      if width * height > max_pixels:
        raise Refusal(413, f"{what}: {width}×{height} is {width * height:,} pixels; this server "
                      f"takes at most {max_pixels:,} per photo")
      return photos.to_rgb(image, what)
  except UnidentifiedImageError:
    raise Refusal(422, f"{what}: cannot read it as an image (not a format PIL knows)") from None
  except Image.DecompressionBombError:  # PIL's own bound, on opening, far above ours.
    raise Refusal(413, f"{what}: far more than {max_pixels:,} pixels") from None
  except (OSError, SyntaxError, ValueError) as e:
    reason = str(e).splitlines()[0] if str(e) else type(e).__name__
    raise Refusal(422, f"{what}: cannot read it as an image ({reason})") from None


def output_images(fg_bg: np.ndarray, prediction: Prediction,
                  kinds: Sequence[str] = PNG_KINDS) -> dict[str, np.ndarray]:
  """The outputs of one pair as the arrays that become its PNGs (module docstring)."""
  images = photos.output_images(prediction, [k for k in kinds if k != "overlay"])
  if "overlay" in kinds:
    # The predict tool's overlay without gaps is four panels of the photo's width; the third is
    # the mask over the composite.
    width = fg_bg.shape[1]
    images["overlay"] = photos.overlay_picture(fg_bg, fg_bg, prediction, gap=0)[
        :, 2 * width:3 * width]
  return images


def _one_line(message: str) -> str:
  return " ".join(message.split())


def _error(status: int, reason: str) -> JSONResponse:
  return JSONResponse({"error": _one_line(reason)}, status_code=status)


async def _read_body(request: Request, limit: int) -> bytes:
  """The request body, refused (413) past `limit` bytes. What is past the limit is read and
  dropped (up to a bound), as web servers do before refusing: a client still sending when the
  server closes the connection sees it reset, not the reason."""
  too_large = Refusal(413, f"upload too large: this server takes at most {limit / 2**20:.1f} MiB "
                      "per request (both photos)")
  drain_limit = limit + _DRAIN_BYTES
  declared = request.headers.get("content-length", "")
  if declared.isdigit() and int(declared) > drain_limit:
    raise too_large
  chunks, size = [], 0
  async for chunk in request.stream():
    size += len(chunk)
    if size > drain_limit:
      break
    if size <= limit:
      chunks.append(chunk)
  if size > limit:
    raise too_large
  return b"".join(chunks)


async def _read_pair(request: Request, max_upload_bytes: int,
                     max_pixels: int) -> tuple[str, np.ndarray, np.ndarray]:
  """(name, bg, fg_bg) from a multipart request, checked: images, bounded, one size."""
  if not request.headers.get("content-type", "").startswith("multipart/form-data"):
    raise Refusal(400, "expected multipart/form-data with the files 'bg' and 'fg_bg' "
                  "(e.g. curl -F bg=@bg.jpg -F fg_bg=@fg_bg.jpg)")
  body = await _read_body(request, max_upload_bytes)

  async def replay():
    return {"type": "http.request", "body": body, "more_body": False}

  try:
    form = await Request(request.scope, replay).form(max_files=len(FIELDS), max_fields=8)
  except HTTPException as e:  # Starlette's reasons for a malformed multipart body.
    raise Refusal(400, f"malformed multipart body: {e.detail}") from None
  try:
    uploads = {}
    for field in FIELDS:
      upload = form.get(field)
      if upload is None:
        raise Refusal(400, f"missing the file '{field}' (send the files 'bg' and 'fg_bg' as "
                      "multipart/form-data)")
      if not isinstance(upload, UploadFile):
        raise Refusal(400, f"'{field}' is a text field; send it as a file")
      uploads[field] = (upload.filename or field, await upload.read())
  finally:
    await form.close()
  images = {}
  for field, (filename, data) in uploads.items():
    what = field if filename == field else f"{field} ({filename})"
    images[field] = await run_in_threadpool(decode_photo, data, what, max_pixels)
  bg, fg_bg = images["bg"], images["fg_bg"]
  if bg.shape != fg_bg.shape:
    raise Refusal(422, f"bg is {image_size(bg)} but fg_bg is {image_size(fg_bg)}; a pair must "
                  "be the same size")
  name = os.path.splitext(os.path.basename(uploads["fg_bg"][0]))[0] or "fg_bg"
  return name, bg, fg_bg


def _requested_format(request: Request) -> str:
  chosen = request.query_params.get("format")
  if chosen is None:
    accept = request.headers.get("accept", "")
    return "mask" if "image/png" in accept and "application/json" not in accept else "json"
  if chosen not in FORMATS:
    raise Refusal(400, f"format={chosen!r}: expected one of {', '.join(FORMATS)}")
  return chosen


def model_description(predictor: Predictor) -> dict:
  config = predictor.config
  name = config.model.name if config is not None else type(predictor.model).__name__
  refined = bool(config.model.get("refiner", False)) if config is not None else False
  return {"model": name + (" + refiner" if refined else ""), "step": int(predictor.step),
          "resolution": int(predictor.resolution), "fit": predictor.fit,
          "clean_mask": bool(predictor.clean_mask), "batch_size": int(predictor.batch_size),
          "device": progress.describe_devices(jax.devices())}


def create_app(predictor: Predictor, *, max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
               max_pixels: int = DEFAULT_MAX_PIXELS, max_queue: int = DEFAULT_MAX_QUEUE,
               max_waiting_pixels: int = DEFAULT_MAX_WAITING_PIXELS,
               max_batch_pixels: int = DEFAULT_MAX_BATCH_PIXELS,
               batch_wait_s: float = 0.005) -> Starlette:
  """The ASGI app (module docstring) over a loaded `predictor`; its model worker starts and
  stops with the app's lifespan. `app.state.worker` is the `ModelWorker`."""
  worker = ModelWorker(predictor, max_queue=max_queue, max_waiting_pixels=max_waiting_pixels,
                       max_batch_pixels=max_batch_pixels, batch_wait_s=batch_wait_s)
  description = model_description(predictor)
  limits = {"max_upload_bytes": max_upload_bytes, "max_pixels": max_pixels,
            "max_queue": max_queue, "max_waiting_pixels": max_waiting_pixels}
  with open(PAGE, encoding="utf-8") as f:
    page = f.read()

  async def index(request: Request) -> Response:
    return HTMLResponse(page)

  async def health(request: Request) -> Response:
    return JSONResponse({**description, "status": "ok", "limits": limits,
                         "served": worker.stats()})

  async def predict(request: Request) -> Response:
    started = time.perf_counter()
    try:
      output = _requested_format(request)
      name, bg, fg_bg = await _read_pair(request, max_upload_bytes, max_pixels)
      prediction = await _wait(worker.submit(bg, fg_bg))
    except Refusal as e:
      return _error(e.status, str(e))
    kinds = PNG_KINDS if output == "json" else (output,)
    encoded = await run_in_threadpool(
        lambda: {kind: files.png_bytes(image)
                 for kind, image in output_images(fg_bg, prediction, kinds).items()})
    if output != "json":
      return Response(encoded[output], media_type="image/png", headers={
          "Content-Disposition": f'inline; filename="{name}_{output}.png"'})
    return JSONResponse({
        "name": name, "width": int(bg.shape[1]), "height": int(bg.shape[0]),
        "step": description["step"], "seconds": round(time.perf_counter() - started, 4),
        **{kind: base64.b64encode(data).decode("ascii") for kind, data in encoded.items()}})

  async def http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return _error(exc.status_code, str(exc.detail))

  @contextlib.asynccontextmanager
  async def lifespan(app: Starlette):
    worker.start()
    try:
      yield
    finally:
      await run_in_threadpool(worker.stop)

  app = Starlette(routes=[Route("/", index), Route("/health", health),
                          Route("/predict", predict, methods=["POST"])],
                  exception_handlers={HTTPException: http_error}, lifespan=lifespan)
  app.state.worker = worker
  return app


async def _wait(future: concurrent.futures.Future) -> Prediction:
  return await asyncio.wrap_future(future)


def loopback_socket(host: str = "127.0.0.1", port: int = 0) -> socket.socket:
  """A bound socket (port 0: a free one) for `uvicorn.Server.run(sockets=[...])`: the port is
  known before the server starts, with no race for it."""
  sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
  sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
  try:
    sock.bind((host, port))
  except OSError as e:
    sock.close()
    raise errors.UserError(f"cannot listen on {host}:{port} ({e.strerror or e})") from None
  return sock


def serve_forever(app: Starlette, sock: socket.socket, log_level: str = "info") -> None:
  """Serves `app` on a bound socket in this thread until Ctrl-C or SIGTERM, each of which lets
  the requests in progress finish first (uvicorn's graceful shutdown)."""
  try:
    uvicorn.Server(uvicorn.Config(app, log_level=log_level)).run(sockets=[sock])
  except KeyboardInterrupt:  # uvicorn raises Ctrl-C again once it has shut down: not an error.
    pass


@contextlib.contextmanager
def running_server(app: Starlette, host: str = "127.0.0.1", port: int = 0,
                   log_level: str = "warning") -> Iterator[str]:
  """Serves `app` with uvicorn in a background thread; yields its base URL, stops on exit."""
  sock = loopback_socket(host, port)
  server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=5))
  thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True,
                            name="dmjax-uvicorn")
  thread.start()
  try:
    deadline = time.monotonic() + 60
    while not server.started:
      if not thread.is_alive() or time.monotonic() > deadline:
        raise RuntimeError("uvicorn did not start")
      time.sleep(0.01)
    bound_host, bound_port = sock.getsockname()[:2]
    yield f"http://{bound_host}:{bound_port}" if ":" not in bound_host else \
        f"http://[{bound_host}]:{bound_port}"
  finally:
    server.should_exit = True
    thread.join()
    sock.close()


def measure_served_requests(predictor: Predictor, *, size: int = 256, concurrency: int = 8,
                            seconds: float = 10.0, batch_wait_s: float = 0.005) -> dict:
  """Requests per second `create_app(predictor)` answers over loopback HTTP.

  `concurrency` client threads each post one size × size pair (PNGs, `photos.demo_pair`) and
  wait for the JSON answer (all four PNGs, base64), again and again for `seconds`, once every batch
  shape the worker can use at that size is compiled (`ModelWorker.warm_up`). Clients and server
  share this process, as a local server and its few clients would share a machine.

  Returns: requests (answered in the window), seconds (the window), requests_per_s,
  latency_median_s and latency_p90_s (per request, as a client sees it), pairs_per_model_call,
  model_calls, compile_s (the warm-up), size, concurrency.
  """
  import requests

  bg, fg_bg = photos.demo_pair(size, size)
  uploads = {"bg": ("bg.png", files.png_bytes(bg), "image/png"),
             "fg_bg": ("fg_bg.png", files.png_bytes(fg_bg), "image/png")}
  app = create_app(predictor, batch_wait_s=batch_wait_s, max_queue=max(64, 2 * concurrency))
  worker: ModelWorker = app.state.worker

  def post(session, url) -> float:
    started = time.perf_counter()
    response = session.post(f"{url}/predict", files=uploads, timeout=600)
    if response.status_code != 200:
      raise RuntimeError(f"/predict answered {response.status_code}: {response.text[:200]}")
    return time.perf_counter() - started

  compile_s = worker.warm_up(size, size, max_waiting=concurrency)
  with running_server(app) as url:
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
      sessions = [requests.Session() for _ in range(concurrency)]
      before = worker.stats()
      end = time.perf_counter() + seconds

      def client(session) -> list[tuple[float, float]]:
        done = []
        while time.perf_counter() < end:
          latency = post(session, url)
          done.append((time.perf_counter(), latency))
        return done

      window_start = time.perf_counter()
      results = [r for rs in pool.map(client, sessions) for r in rs]
      window = time.perf_counter() - window_start
      after = worker.stats()
      for session in sessions:
        session.close()
  latencies = sorted(latency for _, latency in results)
  calls = after["model_calls"] - before["model_calls"]
  pairs = after["pairs"] - before["pairs"]
  return {
      "size": size, "concurrency": concurrency, "requests": len(results),
      "seconds": round(window, 3), "requests_per_s": round(len(results) / window, 3),
      "latency_median_s": round(statistics.median(latencies), 4) if latencies else None,
      "latency_p90_s": round(latencies[int(0.9 * (len(latencies) - 1))], 4) if latencies
      else None,
      "model_calls": calls, "pairs_per_model_call": round(pairs / calls, 2) if calls else None,
      "compile_s": round(compile_s, 3)}
