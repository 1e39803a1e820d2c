"""A trained model behind HTTP: a page at `/` and a JSON or PNG API, one worker for the model.

  app = server.create_app(Predictor.from_workdir("workdirs/r64"))
  uvicorn.run(app, host="127.0.0.1", port=8000)        # what `python -m dmjax.serve` does

Routes:
  GET  /          the page (static/index.html): pick two photos (and optionally a new
                  background), see mask, depth, overlay, the cut-out and the new background
  GET  /health    JSON: model, run, checkpoint step, device, fit, limits, counters, and whether
                  the server is ready (`ready`, `status`) and its model thread alive
                  (`worker_alive`); 503 until ready and once the thread has stopped
  POST /predict   multipart/form-data with the files `bg` and `fg_bg`, and optionally
                  `replace_bg` (a photo to put the object on) →
                    ?format=json (default): {"name", "width", "height", "step", "seconds"
                      (from arrival to prediction), "mask", "depth", "depth_color", "overlay",
                      "cutout"[, "replace_bg"]}, each image a base64 PNG
                    ?format=mask|depth|depth_color|overlay|cutout|replace_bg: that one PNG
                      (image/png); so does `Accept: image/png` without `format` (the mask)

The PNGs are those of `dmjax.predict` (`dmjax.inference.photos`): the mask 8-bit (probability ×
255), depth 16-bit (× 65535, 0 = nearest), depth colour-mapped; `overlay` is the mask tinted over
the composite (the third panel of the predict tool's NAME_overlay.png); `cutout` the composite
as RGBA with the soft mask as alpha, `replace_bg` the object over the `replace_bg` photo (fitted
to cover the frame) (`dmjax.inference.outputs`).

Bad input is refused with a 4xx and `{"error": "one line"}`, each refusal as early as it can be
told, and the request's alone (the server keeps serving):
  400  a malformed request, a missing field
  403  an `Origin` that is not the server's own (another web site's page posting to it)
  408  a body that did not arrive within `read_timeout_s` (a slow sender holds no slot for ever)
  413  a `Content-Length` over `max_upload_bytes` (before reading the body), a body that passes
       it (cut off there), a photo over `max_pixels` (from its header, before decoding)
  421  a `Host` that is not a name this server answers to (`allowed_hosts`: DNS rebinding)
  422  a file that is not a PNG, JPEG, WebP, TIFF, BMP or GIF photo (or HEIC, with pillow-heif),
       or does not decode (`dmjax.image_decode`); a pair of two sizes
  503  (with Retry-After) while warming up, when `max_queue` pairs or `max_waiting_pixels` wait
       for the model, when no reading slot frees within `admission_timeout_s`, or once the model
       thread has stopped.

Admission bounds memory: at most `max_reading` requests are read and decoded at once (an
`asyncio.Semaphore`), their photos decoded by at most `max_decoding` of them at a time; their
bodies stream to the multipart parser's spooled files (memory past 1 MiB a file goes to disk),
each photo is decoded from its own bytes, one at a time. The others
wait for a slot holding only their headers and the 64 KiB uvicorn buffers (it stops reading a
body it is not asked for), and uvicorn answers 503 past `max_connections`. Decoded, a pair's
pixels count against `max_waiting_pixels` until its answer is encoded; at most `max_encoding`
answers are encoded at once, a strip of rows at a time, and a JSON answer's base64 is made as it
is sent.

Only one thread calls the model (`ModelWorker`): requests wait in a bounded queue, and each round
takes every request waiting and splits those of one size into batches of a few sizes (the most
a call takes, else powers of two: 13 → 8 + 4 + 1), so concurrent clients share calls and compiled
programs, and no call computes padding. The model itself runs at a few working sizes whatever
the photos' (`Predictor.model_input_shapes`): with `warm_up=predictor.warm_up` they compile
before the server says it is ready, and no photo size compiles anything after.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import dataclasses
import json
import logging
import math
import os
import queue
import socket
import statistics
import threading
import time
import unicodedata
import urllib.parse
from collections import Counter
from collections.abc import Callable, Iterator, Sequence

import jax
import numpy as np
import uvicorn
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers, UploadFile
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from dmjax import errors, files, image_decode, progress
from dmjax.inference import outputs, photos
from dmjax.inference.predictor import Prediction, Predictor, image_size, split_batches

PNG_KINDS = (*photos.OUTPUT_KINDS, "overlay", "cutout", "replace_bg")
FORMATS = ("json", *PNG_KINDS)
PAIR_FIELDS = ("bg", "fg_bg")
NEW_BACKGROUND = "replace_bg"  # The optional third file, and the output it gives.
FIELDS = (*PAIR_FIELDS, NEW_BACKGROUND)
PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static", "index.html")

DEFAULT_MAX_UPLOAD_BYTES = 40 * 2**20  # A request's files together: two 12-megapixel JPEGs fit.
DEFAULT_MAX_PIXELS = 16_000_000  # Per photo: 4,000 × 4,000 (time and memory grow with pixels).
DEFAULT_MAX_QUEUE = 64  # Pairs waiting for the model; beyond, 503.
# Pixels of the pairs in hand, from their submission to the model until their answer is encoded
# (photos 6 bytes a pixel, a new background counted half, the prediction 8 more): beyond, 503.
DEFAULT_MAX_WAITING_PIXELS = 64_000_000
DEFAULT_MAX_BATCH_PIXELS = 8_000_000  # Pixels per model call: larger photos run one at a time.
DEFAULT_MAX_READING = 8  # Requests read and decoded at once; the others wait for a slot.
# Of those, requests whose photos are decoded at once (memory: ~20 bytes a pixel while decoding).
DEFAULT_MAX_DECODING = 2
DEFAULT_MAX_ENCODING = 2  # Answers made into PNGs at once (CPU and memory bound); others wait.
OUTPUT_ROWS = 256  # Rows of a photo made into outputs at a time: temporaries of bounded size.
DEFAULT_READ_TIMEOUT_S = 60.0  # For a whole body to arrive (40 MiB at 0.7 MB/s); beyond, 408.
DEFAULT_ADMISSION_TIMEOUT_S = 30.0  # For a reading slot to free; beyond, 503.
DEFAULT_MAX_CONNECTIONS = 200  # uvicorn's limit_concurrency: past it, uvicorn's own 503.
RETRY_AFTER_S = 2  # What a 503 tells the client to wait.
# Names the server answers to besides --host and --allowed_hosts (DNS rebinding: a page of
# another site whose name resolves to 127.0.0.1 sends its own name as Host).
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")

log = logging.getLogger(__name__)


class Refusal(Exception):
  """A request the server will not serve: an HTTP status, a one-line reason, and headers."""

  def __init__(self, status: int, reason: str, headers: dict[str, str] | None = None):
    super().__init__(reason)
    self.status = status
    self.headers = headers or {}


class Busy(Refusal):
  """503: the server cannot take the request now; Retry-After says when to try again."""

  def __init__(self, reason: str):
    super().__init__(503, reason, {"Retry-After": str(RETRY_AFTER_S)})


class QueueFull(Busy):
  def __init__(self, waiting: int):
    super().__init__(f"busy: {waiting} pairs are waiting for the model; try again shortly")


@dataclasses.dataclass
class _Job:
  bg: np.ndarray
  fg_bg: np.ndarray
  future: concurrent.futures.Future


class ModelWorker:
  """The one thread that calls the model; `submit` a pair from any thread, get a Future.

  Started, it first runs `warm_up` (if any: compiling the model's working sizes), then is
  `ready`. Each round waits `batch_wait_s` after the first pair arrives (so that a burst shares
  calls), takes every pair waiting, and runs those of one size in batches of at most
  `predictor.batch_size` pairs and `max_batch_pixels` pixels (`split_batches`). Should the
  thread end (`alive` False), what waits is refused and so is what comes.

  A submitted pair's pixels count against `max_waiting_pixels` until `release(future)`: the
  server releases them once the answer is encoded, so that what is in hand after decoding
  (photos, predictions, outputs) is bounded, not only what waits in the queue.
  """

  def __init__(self, predictor: Predictor, *, max_queue: int = DEFAULT_MAX_QUEUE,
               max_waiting_pixels: int = DEFAULT_MAX_WAITING_PIXELS,
               max_batch_pixels: int = DEFAULT_MAX_BATCH_PIXELS, batch_wait_s: float = 0.005,
               warm_up: Callable[[], object] | None = None):
    self.predictor = predictor
    self.max_waiting_pixels = max_waiting_pixels
    self.max_batch_pixels = max_batch_pixels
    self.batch_wait_s = batch_wait_s
    self._warm_up = warm_up
    self._queue: queue.Queue[_Job | None] = queue.Queue(maxsize=max_queue)
    self._thread: threading.Thread | None = None
    self._lock = threading.Lock()
    self._ready = threading.Event()
    self._resumed = threading.Event()
    self._resumed.set()
    # Pairs queued (ever), answered, model calls made and failed.
    self._stats = {"received": 0, "pairs": 0, "model_calls": 0, "failed_calls": 0}
    self._warm_up_s: float | None = None
    self._stop_reason: str | None = None
    self._held_pixels = 0
    self._batch_sizes: Counter[int] = Counter()  # Pairs in a call → calls.

  def start(self) -> None:
    if not self.alive:
      self._stop_reason = None
      self._thread = threading.Thread(target=self._run, name="dmjax-model", daemon=True)
      self._thread.start()

  def stop(self) -> None:
    if self._thread is not None:
      self._queue.put(None)
      self._resumed.set()
      self._thread.join()

  @property
  def alive(self) -> bool:
    """Whether the model thread runs (started, not ended)."""
    return self._thread is not None and self._thread.is_alive()

  @property
  def ready(self) -> bool:
    """Alive and warmed up: what it takes now runs without compiling its working sizes."""
    return self.alive and self._ready.is_set()

  def state(self) -> str:
    if self._thread is None:
      return "not started"
    if not self._thread.is_alive():
      return "stopped"
    return "ready" if self._ready.is_set() else "warming up"

  def check_accepting(self) -> None:
    """Raises `Busy` when `submit` would refuse whatever it is given (a stopped or warming
    worker, a full queue): called before a request's body is read."""
    state = self.state()
    if state == "stopped":
      raise self._stopped()
    if state == "warming up":
      raise Busy("warming up: compiling the model's working sizes; try again shortly")
    if self._queue.full():
      raise QueueFull(self._queue.qsize())

  def check_room(self, pixels: int) -> None:
    """Raises `Busy` when a pair of `pixels` would be refused now (`submit`): called from a
    photo's header, before decoding it."""
    self.check_accepting()
    with self._lock:
      if self._held_pixels and self._held_pixels + pixels > self.max_waiting_pixels:
        raise self._no_room()

  def _no_room(self) -> Busy:
    return Busy(f"busy: {self._held_pixels / 1e6:.1f} megapixels of photos are in hand; try "
                "again shortly")

  def submit(self, bg: np.ndarray, fg_bg: np.ndarray,
             new_bg_pixels: int = 0) -> concurrent.futures.Future:
    """Queues one checked pair (uint8 RGB, one size); the Future gets its `Prediction`. Its
    pixels (and half of `new_bg_pixels`, a new background held with it) are held until
    `release(future)`. Raises `Busy` when the worker is warming up or stopped, when `max_queue`
    pairs wait, or when `max_waiting_pixels` are held (one pair is taken whatever its size)."""
    self.check_accepting()
    job = _Job(bg, fg_bg, concurrent.futures.Future())
    pixels = bg.shape[0] * bg.shape[1] + (new_bg_pixels + 1) // 2
    with self._lock:
      if self._held_pixels and self._held_pixels + pixels > self.max_waiting_pixels:
        raise self._no_room()
      try:
        self._queue.put_nowait(job)
      except queue.Full:
        raise QueueFull(self._queue.qsize()) from None
      self._held_pixels += pixels
      self._stats["received"] += 1
    job.future.held_pixels = pixels
    return job.future

  def release(self, future: concurrent.futures.Future) -> None:
    """Gives back what `submit` held for this Future (once; later calls do nothing)."""
    with self._lock:
      self._held_pixels -= getattr(future, "held_pixels", 0)
      future.held_pixels = 0

  def stats(self) -> dict:
    with self._lock:
      return {**self._stats, "waiting": self._queue.qsize(), "held_pixels": self._held_pixels,
              "warm_up_s": self._warm_up_s,
              "batch_sizes": {str(k): v for k, v in sorted(self._batch_sizes.items())}}

  @contextlib.contextmanager
  def paused(self) -> Iterator[None]:
    """Pairs submitted in the block wait; on leaving it, one round takes every one of them
    (a burst shares calls whatever its timing)."""
    self._resumed.clear()
    try:
      yield
    finally:
      self._resumed.set()

  def _take(self, timeout: float | None = None) -> _Job | None:
    return self._queue.get(timeout=timeout)

  def _run(self) -> None:
    try:
      if self._warm_up is not None:
        started = time.perf_counter()
        self._warm_up()
        self._warm_up_s = round(time.perf_counter() - started, 3)
        log.info("warmed up in %.1f s", self._warm_up_s)
      self._ready.set()
      self._loop()
    except BaseException as e:  # Whatever ends the thread: what waits must not wait for ever.
      log.exception("the model thread stopped")
      self._stop_reason = f"{type(e).__name__}: {e}".splitlines()[0]
    finally:
      self._ready.clear()
      self._refuse_waiting(self._stopped())

  def _stopped(self) -> Busy:
    reason = f" ({self._stop_reason})" if self._stop_reason else ""
    return Busy(f"the model thread has stopped{reason}; the server needs a restart")

  def _refuse_waiting(self, refusal: Refusal) -> None:
    while True:
      try:
        job = self._take(timeout=0)
      except queue.Empty:
        return
      if job is not None and job.future.set_running_or_notify_cancel():
        job.future.set_exception(refusal)

  def _loop(self) -> None:
    while True:
      job = self._take()
      if job is None:
        return
      self._resumed.wait()
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
    # A request whose client went away may have cancelled its Future: skip it.
    jobs = [job for job in jobs if job.future.set_running_or_notify_cancel()]
    try:
      by_shape: dict[tuple, list[_Job]] = {}
      for job in jobs:
        by_shape.setdefault(job.bg.shape, []).append(job)
      for shape, same_size in by_shape.items():
        start = 0
        for size in split_batches(len(same_size), self.batch_limit(*shape[:2])):
          self._run_batch(same_size[start:start + size])
          start += size
    except Exception as e:  # A bug of ours: the round's requests fail, the worker goes on.
      log.exception("a round of %d pairs failed", len(jobs))
      for job in jobs:
        if not job.future.done():
          job.future.set_exception(Refusal(500, f"internal error: {type(e).__name__}"))

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


def decode_photo(data: bytes, what: str, max_pixels: int,
                 admit: Callable[[int, int], None] | None = None) -> np.ndarray:
  """An uploaded file → uint8 RGB (H, W, 3), upright per EXIF, as `photos.read_image` reads
  files: raster formats only, more than `max_pixels` refused (413) from the header, before
  decoding, as is what `admit(width, height)` refuses; anything else that fails is a 422
  (`dmjax.image_decode`)."""
  try:
    with image_decode.opened(data, what, max_pixels=max_pixels, admit=admit) as image:
      return photos.to_rgb(image, what)
  except image_decode.ImageTooLarge as e:
    raise Refusal(413, str(e)) from None
  except errors.UserError as e:
    raise Refusal(422, str(e)) from None


def _by_rows(make: Callable[..., np.ndarray], *images: np.ndarray) -> np.ndarray:
  """`make(*images)`, made `OUTPUT_ROWS` rows at a time: the same array, but the float
  temporaries of the colour map or the blending take a strip's memory, not a 16 MP photo's
  (gigabytes)."""
  height = images[0].shape[0]
  strip = make(*(image[:OUTPUT_ROWS] for image in images))
  result = np.empty((height, *strip.shape[1:]), strip.dtype)
  result[:len(strip)] = strip
  for top in range(OUTPUT_ROWS, height, OUTPUT_ROWS):
    result[top:top + OUTPUT_ROWS] = make(*(image[top:top + OUTPUT_ROWS] for image in images))
  return result


def _output_image(kind: str, fg_bg: np.ndarray, mask: np.ndarray, depth: np.ndarray,
                  new_bg: np.ndarray | None) -> np.ndarray:
  if kind in photos.OUTPUT_KINDS:
    return photos.output_images(Prediction(mask, depth), [kind])[kind]
  if kind == "overlay":
    # The predict tool's overlay without gaps is four panels of the photo's width; the third is
    # the mask over the composite.
    width = fg_bg.shape[1]
    return photos.overlay_picture(fg_bg, fg_bg, Prediction(mask, depth), gap=0)[
        :, 2 * width:3 * width]
  if kind == "cutout":
    return outputs.cutout_rgba(fg_bg, mask)
  return outputs.replace_background(fg_bg, mask, new_bg)  # `new_bg` fitted to `fg_bg` already.


def output_images(fg_bg: np.ndarray, prediction: Prediction, kinds: Sequence[str] = PNG_KINDS,
                  new_bg: np.ndarray | None = None) -> dict[str, np.ndarray]:
  """The outputs of one pair as the arrays that become its PNGs (module docstring), made a
  strip at a time (`_by_rows`); `replace_bg` needs `new_bg`."""
  fitted = None if new_bg is None else outputs.fit_cover(new_bg, *fg_bg.shape[:2])
  return {kind: _by_rows(lambda f, m, d, n, kind=kind: _output_image(kind, f, m, d, n), fg_bg,
                         prediction.mask, prediction.depth,
                         fitted if fitted is not None else fg_bg)
          for kind in kinds}


def encode_outputs(fg_bg: np.ndarray, prediction: Prediction, kinds: Sequence[str],
                   new_bg: np.ndarray | None = None) -> dict[str, bytes]:
  """{kind: PNG bytes}, one output array in memory at a time."""
  return {kind: files.png_bytes(output_images(fg_bg, prediction, (kind,), new_bg)[kind])
          for kind in kinds}


def json_answer(fields: dict, pngs: dict[str, bytes]) -> tuple[Iterator[bytes], int]:
  """The JSON answer (`fields`, then each PNG base64-encoded) as pieces to stream, and its
  length: the base64 text is made a few MiB at a time, as it is sent, not all at once (three
  copies of tens of MB for a 16 MP pair, in a string, a JSON document and its bytes)."""
  head = json.dumps(fields)[:-1].encode()
  keys = {kind: f', "{kind}": "'.encode() for kind in pngs}
  length = len(head) + 1 + sum(len(key) + 4 * math.ceil(len(pngs[kind]) / 3) + 1
                               for kind, key in keys.items())
  step = 3 * 2**20  # A multiple of 3: the pieces' base64 joins into the whole's.

  def pieces() -> Iterator[bytes]:
    yield head
    for kind, key in keys.items():
      data = memoryview(pngs.pop(kind))
      yield key
      for start in range(0, len(data), step):
        yield base64.b64encode(data[start:start + step])
      yield b'"'
    yield b"}"

  return pieces(), length


def content_disposition(filename: str) -> str:
  """`inline` with `filename`, any characters: an ASCII fallback (quotes and backslashes
  escaped, what is not printable ASCII transliterated or dropped) and RFC 5987's UTF-8
  `filename*` for clients that read it (all current browsers). Header values are
  Latin-1 on the wire: a raw 'żółw.png' there would fail the response after the model ran."""
  decomposed = unicodedata.normalize("NFKD", filename)
  fallback = "".join(c for c in decomposed if 32 <= ord(c) < 127)
  stem, dot, extension = fallback.rpartition(".")
  if not dot:
    stem, extension = extension, "png"
  if not stem.strip(" ._-"):  # Nothing left of the name but its extension.
    fallback = f"image.{extension}"
  fallback = fallback.replace("\\", "\\\\").replace('"', '\\"')
  encoded = urllib.parse.quote(filename, safe="")
  return f"inline; filename=\"{fallback}\"; filename*=UTF-8''{encoded}"


def _one_line(message: str) -> str:
  return " ".join(message.split())


def _error(status: int, reason: str, headers: dict[str, str] | None = None) -> JSONResponse:
  return JSONResponse({"error": _one_line(reason)}, status_code=status, headers=headers)


def allowed_hosts(host: str = "127.0.0.1", extra: Sequence[str] = ()) -> frozenset[str]:
  """The `Host` names a server listening on `host` answers to: this machine's loopback names,
  `host` itself (unless a wildcard address) and `extra` ("*": any)."""
  names = {*LOCAL_HOSTS, *(name.strip().lower().strip("[]") for name in extra if name.strip())}
  if host not in ("0.0.0.0", "::", ""):
    names.add(host.lower().strip("[]"))
  return frozenset(names)


def _host_name(authority: str) -> str:
  """A Host header's name: 'Example.org:8000' → 'example.org', '[::1]:8000' → '::1'."""
  authority = authority.strip().lower()
  if authority.startswith("["):
    return authority[1:authority.find("]")] if "]" in authority else authority
  return authority.rsplit(":", 1)[0] if authority.count(":") == 1 else authority


def cross_site_refusal(headers: Headers, hosts: frozenset[str]) -> Refusal | None:
  """421 for a `Host` not in `hosts` (DNS rebinding: another site's name resolving here), 403
  for an `Origin` that is not this server's own (another site's page posting a form here: a
  multipart POST needs no CORS preflight); None for a request to serve."""
  host = headers.get("host", "")
  if "*" not in hosts and _host_name(host) not in hosts:
    return Refusal(421, f"Host {host[:100]!r} is not a name this server answers to ("
                   f"{', '.join(sorted(hosts))}); start it with --allowed_hosts=NAME to add one")
  origin = headers.get("origin")
  if origin is not None:
    parsed = urllib.parse.urlsplit(origin)
    if parsed.scheme not in ("http", "https") or parsed.netloc.lower() != host.lower():
      return Refusal(403, f"refused a request from the page of {origin[:100]!r}: this server "
                     f"answers its own page (http://{host[:100]}) and clients that send no "
                     "Origin")
  return None


class CrossSiteGuard:
  """ASGI middleware: `cross_site_refusal` for every HTTP request, before any route runs."""

  def __init__(self, app, hosts: frozenset[str]):
    self.app = app
    self.hosts = hosts

  async def __call__(self, scope, receive, send) -> None:
    if scope["type"] == "http":
      refusal = cross_site_refusal(Headers(scope=scope), self.hosts)
      if refusal is not None:
        log.warning("refused: %s", refusal)
        await _error(refusal.status, str(refusal))(scope, receive, send)
        return
    await self.app(scope, receive, send)


def _bounded_receive(receive, limit: int, timeout_s: float):
  """`receive` for a request body refused past `limit` bytes (413, without reading further)
  and unless it all arrives within `timeout_s` (408; the connection is closed)."""
  loop = asyncio.get_running_loop()
  deadline = loop.time() + timeout_s
  received = 0

  async def bounded():
    nonlocal received
    try:
      message = await asyncio.wait_for(receive(), max(deadline - loop.time(), 0.0))
    except asyncio.TimeoutError:
      raise Refusal(408, f"the upload did not arrive within {timeout_s:g} s ({received:,} bytes "
                    "came); send it again from a faster connection", {"Connection": "close"}) \
          from None
    if message["type"] == "http.request":
      received += len(message.get("body", b""))
      if received > limit:
        raise _too_large(limit)
    return message

  return bounded


def _too_large(limit: int) -> Refusal:
  return Refusal(413, f"upload too large: this server takes at most {limit / 2**20:.1f} MiB per "
                 "request (all its photos)")


def _check_request(request: Request, max_upload_bytes: int) -> None:
  """What the headers alone tell: a body that is not multipart, or declared too large."""
  if not request.headers.get("content-type", "").startswith("multipart/form-data"):
    raise Refusal(400, "expected multipart/form-data with the files 'bg' and 'fg_bg' "
                  "(e.g. curl -F bg=@bg.jpg -F fg_bg=@fg_bg.jpg)")
  declared = request.headers.get("content-length", "")
  if declared.isdigit() and int(declared) > max_upload_bytes:
    raise _too_large(max_upload_bytes)


async def _read_uploads(request: Request, max_upload_bytes: int,
                        read_timeout_s: float) -> dict[str, UploadFile]:
  """The multipart body's files, streamed to spooled files (on disk past 1 MiB each), bounded
  in bytes and time (`_bounded_receive`). Close them (`_close`)."""
  receive = _bounded_receive(request.receive, max_upload_bytes, read_timeout_s)
  try:
    form = await Request(request.scope, receive).form(max_files=len(FIELDS), max_fields=8)
  except HTTPException as e:  # Starlette's reasons for a malformed multipart body.
    raise Refusal(400, f"malformed multipart body: {e.detail}") from None
  except ClientDisconnect:
    raise Refusal(400, "the client went away before sending the whole body") from None
  uploads: dict[str, UploadFile] = {}
  problem = None
  for field, value in form.multi_items():
    if field in FIELDS and field not in uploads and isinstance(value, UploadFile):
      uploads[field] = value
    elif isinstance(value, UploadFile):  # Another field's file, or a second one: not read.
      await value.close()
    elif field in FIELDS and problem is None:
      problem = Refusal(400, f"'{field}' is a text field; send it as a file")
  missing = [field for field in PAIR_FIELDS if field not in uploads]
  if problem is None and missing:
    problem = Refusal(400, f"missing the file '{missing[0]}' (send the files 'bg' and 'fg_bg' "
                      "as multipart/form-data)")
  if problem is not None:
    await _close(uploads)
    raise problem
  return uploads


async def _close(uploads: dict[str, UploadFile]) -> None:
  for upload in uploads.values():
    await upload.close()


async def _decode_uploads(uploads: dict[str, UploadFile], max_pixels: int,
                          admit_pair: Callable[[int, int], None] | None = None
                          ) -> dict[str, tuple[str, np.ndarray]]:
  """{field: (file name, uint8 RGB)}, one photo in memory as bytes at a time; `admit_pair`
  sees the size of `bg` (the pair's) before it is decoded."""
  images = {}
  for field, upload in uploads.items():
    filename = upload.filename or field
    data = await upload.read()
    await upload.close()
    what = field if filename == field else f"{field} ({filename})"
    admit = admit_pair if field == "bg" else None
    images[field] = (filename,
                     await run_in_threadpool(decode_photo, data, what, max_pixels, admit))
    del data
  return images


def _requested_format(request: Request) -> str:
  chosen = request.query_params.get("format")
  if chosen is None:
    accept = request.headers.get("accept", "")
    return "mask" if "image/png" in accept and "application/json" not in accept else "json"
  if chosen not in FORMATS:
    raise Refusal(400, f"format={chosen!r}: expected one of {', '.join(FORMATS)}")
  return chosen


def model_description(predictor: Predictor, source: str | None = None) -> dict:
  """The model as /health names it: its name (with " + refiner"), `run` (the workdir's or the
  exported file's name, never a path) and how it runs."""
  config = predictor.config
  if config is not None:
    name = config.model.name
    refined = bool(config.model.get("refiner", False))
  elif predictor.exported is not None:
    name = str(predictor.exported.metadata["model"])
    refined = bool(predictor.exported.metadata["refiner"])
  else:
    name, refined = type(predictor.model).__name__, False
  return {"model": name + (" + refiner" if refined else ""),
          "run": os.path.basename(os.path.normpath(source)) if source else None,
          "step": int(predictor.step), "resolution": int(predictor.resolution),
          "fit": predictor.fit, "clean_mask": bool(predictor.clean_mask),
          "batch_size": int(predictor.batch_size),
          "device": progress.describe_devices(jax.devices())}


def create_app(predictor: Predictor, *, max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
               max_pixels: int = DEFAULT_MAX_PIXELS, max_queue: int = DEFAULT_MAX_QUEUE,
               max_waiting_pixels: int = DEFAULT_MAX_WAITING_PIXELS,
               max_batch_pixels: int = DEFAULT_MAX_BATCH_PIXELS,
               max_reading: int = DEFAULT_MAX_READING,
               max_decoding: int = DEFAULT_MAX_DECODING,
               max_encoding: int = DEFAULT_MAX_ENCODING,
               read_timeout_s: float = DEFAULT_READ_TIMEOUT_S,
               admission_timeout_s: float = DEFAULT_ADMISSION_TIMEOUT_S,
               hosts: frozenset[str] | None = None, source: str | None = None,
               warm_up: Callable[[], object] | None = None,
               batch_wait_s: float = 0.005) -> Starlette:
  """The ASGI app (module docstring) over a loaded `predictor`; its model worker starts (and
  runs `warm_up`) and stops with the app's lifespan. `app.state.worker` is the `ModelWorker`.

  `hosts`: the Host names answered (default `allowed_hosts()`: this machine's loopback);
  `source`: the workdir or exported file, whose name /health reports.
  """
  worker = ModelWorker(predictor, max_queue=max_queue, max_waiting_pixels=max_waiting_pixels,
                       max_batch_pixels=max_batch_pixels, batch_wait_s=batch_wait_s,
                       warm_up=warm_up)
  description = model_description(predictor, source)
  limits = {"max_upload_bytes": max_upload_bytes, "max_pixels": max_pixels,
            "max_queue": max_queue, "max_waiting_pixels": max_waiting_pixels,
            "max_reading": max_reading, "max_decoding": max_decoding,
            "max_encoding": max_encoding,
            "read_timeout_s": read_timeout_s}
  # Made in the server's event loop (lifespan).
  reading_slots: asyncio.Semaphore | None = None
  decoding_slots: asyncio.Semaphore | None = None
  encoding_slots: asyncio.Semaphore | None = None
  reading = 0  # Requests holding a slot now.
  with open(PAGE, encoding="utf-8") as f:
    page = f.read()

  async def index(request: Request) -> Response:
    return HTMLResponse(page)

  async def health(request: Request) -> Response:
    state = worker.state()
    return JSONResponse({**description, "status": state, "ready": worker.ready,
                         "worker_alive": worker.alive, "limits": limits,
                         "served": {**worker.stats(), "reading": reading}},
                        status_code=200 if worker.ready else 503)

  async def admitted(request: Request) -> tuple[str, dict[str, tuple[str, np.ndarray]]]:
    """(format, {field: (file name, photo)}) of a request that passed every check before the
    model; a `Refusal` at the first that fails, each as early as it can be told."""
    nonlocal reading
    output = _requested_format(request)
    _check_request(request, max_upload_bytes)
    worker.check_accepting()
    try:
      await asyncio.wait_for(reading_slots.acquire(), admission_timeout_s)
    except asyncio.TimeoutError:
      raise Busy(f"busy: {max_reading} requests are being read; try again shortly") from None
    reading += 1
    try:
      uploads = await _read_uploads(request, max_upload_bytes, read_timeout_s)
      try:
        async with decoding_slots:
          images = await _decode_uploads(
              uploads, max_pixels, lambda width, height: worker.check_room(width * height))
      finally:
        await _close(uploads)
    finally:
      reading -= 1
      reading_slots.release()
    (_, bg), (_, fg_bg) = images["bg"], images["fg_bg"]
    if bg.shape != fg_bg.shape:
      raise Refusal(422, f"bg is {image_size(bg)} but fg_bg is {image_size(fg_bg)}; a pair must "
                    "be the same size")
    if output == NEW_BACKGROUND and NEW_BACKGROUND not in images:
      raise Refusal(400, f"format={NEW_BACKGROUND} needs a third file '{NEW_BACKGROUND}': the "
                    "photo to put the object on")
    return output, images

  async def predict(request: Request) -> Response:
    started = time.perf_counter()
    try:
      output, images = await admitted(request)
      bg, fg_bg = images["bg"][1], images["fg_bg"][1]
      new_bg = images[NEW_BACKGROUND][1] if NEW_BACKGROUND in images else None
      future = worker.submit(bg, fg_bg,
                             new_bg_pixels=0 if new_bg is None else math.prod(new_bg.shape[:2]))
    except Refusal as e:
      return _error(e.status, str(e), e.headers)
    try:
      prediction = await _wait(future)
      seconds = time.perf_counter() - started
      kinds = ((output,) if output != "json" else
               tuple(k for k in PNG_KINDS if k != NEW_BACKGROUND or new_bg is not None))
      async with encoding_slots:
        pngs = await run_in_threadpool(encode_outputs, fg_bg, prediction, kinds, new_bg)
    except Refusal as e:
      return _error(e.status, str(e), e.headers)
    finally:
      worker.release(future)
    name = os.path.splitext(os.path.basename(images["fg_bg"][0]))[0] or "fg_bg"
    if output != "json":
      return Response(pngs[output], media_type="image/png", headers={
          "Content-Disposition": content_disposition(f"{name}_{output}.png")})
    pieces, length = json_answer(
        {"name": name, "width": int(bg.shape[1]), "height": int(bg.shape[0]),
         "step": description["step"], "seconds": round(seconds, 4)}, pngs)
    return StreamingResponse(pieces, media_type="application/json",
                             headers={"Content-Length": str(length)})

  async def http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return _error(exc.status_code, str(exc.detail))

  @contextlib.asynccontextmanager
  async def lifespan(app: Starlette):
    nonlocal reading_slots, decoding_slots, encoding_slots
    reading_slots = asyncio.Semaphore(max_reading)
    decoding_slots = asyncio.Semaphore(max_decoding)
    encoding_slots = asyncio.Semaphore(max_encoding)
    worker.start()
    try:
      yield
    finally:
      await run_in_threadpool(worker.stop)

  app = Starlette(routes=[Route("/", index), Route("/health", health),
                          Route("/predict", predict, methods=["POST"])],
                  middleware=[Middleware(CrossSiteGuard, hosts=hosts or allowed_hosts())],
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


def uvicorn_config(app: Starlette, log_level: str = "info",
                   max_connections: int = DEFAULT_MAX_CONNECTIONS, **settings) -> uvicorn.Config:
  """uvicorn's settings for `app`: past `max_connections` connections and requests at once,
  uvicorn answers 503 itself (`limit_concurrency`: a bound on the connections that wait for a
  reading slot, each holding its headers and a 64 KiB buffer)."""
  return uvicorn.Config(app, log_level=log_level, limit_concurrency=max_connections, **settings)


def serve_forever(app: Starlette, sock: socket.socket, log_level: str = "info",
                  max_connections: int = DEFAULT_MAX_CONNECTIONS) -> None:
  """Serves `app` on a bound socket in this thread until Ctrl-C or SIGTERM, each of which lets
  the requests in progress finish first (uvicorn's graceful shutdown)."""
  try:
    uvicorn.Server(uvicorn_config(app, log_level, max_connections)).run(sockets=[sock])
  except KeyboardInterrupt:  # uvicorn raises Ctrl-C again once it has shut down: not an error.
    pass


@contextlib.contextmanager
def running_server(app: Starlette, host: str = "127.0.0.1", port: int = 0,
                   log_level: str = "warning") -> Iterator[str]:
  """Serves `app` with uvicorn in a background thread; yields its base URL, stops on exit."""
  sock = loopback_socket(host, port)
  server = uvicorn.Server(uvicorn_config(app, log_level, timeout_graceful_shutdown=5))
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
  wait for the JSON answer (all five PNGs, base64), again and again for `seconds`, once every batch
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


def _memory_mb(pid: int) -> dict[str, float]:
  """VmRSS (now) and VmHWM (the peak) of a process, in MB (Linux /proc)."""
  with open(f"/proc/{pid}/status") as f:
    fields = dict(line.split(":", 1) for line in f if ":" in line)
  return {key: int(fields[key].split()[0]) / 1000 for key in ("VmRSS", "VmHWM")}


def large_photo_png(height: int, width: int, target_bytes: int, seed: int = 0) -> bytes:
  """A PNG of a smooth photo with noise in its top rows, about `target_bytes` long: an upload
  as large in bytes as in pixels (noise does not compress; 3 bytes a pixel)."""
  rng = np.random.default_rng(seed)
  image = np.asarray(photos.demo_pair(height, width, seed=seed)[0]).copy()
  rows = min(height, max(1, target_bytes // (3 * width)))
  image[:rows] = rng.integers(0, 256, (rows, width, 3), np.uint8)
  return files.png_bytes(image)


def measure_upload_memory(workdir: str, *, clients: int = 16, height: int = 4000,
                          width: int = 4000, flags: Sequence[str] = ()) -> dict:
  """Peak memory of `python -m dmjax.serve --workdir=WORKDIR` (a process of its own, default
  limits unless `flags`) while `clients` clients post at once each a pair of height × width
  PNGs about as large as the upload limit allows (`large_photo_png`), and ask for the JSON
  answer. One such request goes first, alone, so that compiling is not in the figure.

  Returns: clients, photo (W×H), request_bytes, statuses (HTTP status → count), seconds,
  baseline_mb (resident memory before the uploads), peak_mb (the process's peak resident
  memory during them, VmHWM reset before), peak_over_baseline_mb.
  """
  import subprocess  # noqa: PLC0415
  import sys  # noqa: PLC0415

  import requests  # noqa: PLC0415

  with loopback_socket() as sock:
    port = sock.getsockname()[1]
  process = subprocess.Popen(
      [sys.executable, "-m", "dmjax.serve", f"--workdir={workdir}", f"--port={port}",
       *flags], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  url = f"http://127.0.0.1:{port}"
  try:
    deadline = time.monotonic() + 600
    while True:
      if process.poll() is not None:
        raise RuntimeError(f"the server exited: {process.stderr.read()[-2000:]}")
      try:
        if requests.get(f"{url}/health", timeout=5).status_code == 200:
          break
      except requests.ConnectionError:
        pass
      if time.monotonic() > deadline:
        raise RuntimeError("the server was not ready in 600 s")
      time.sleep(0.5)
    limit = requests.get(f"{url}/health", timeout=5).json()["limits"]["max_upload_bytes"]
    # Two photos a little under half the limit each (the multipart framing takes the rest).
    target = max(limit // 2 - 2**19, int(0.45 * limit))
    uploads = {name: (f"{name}.png", large_photo_png(height, width, target, seed=seed),
                      "image/png") for seed, name in enumerate(PAIR_FIELDS)}
    request_bytes = sum(len(data) for _, data, _ in uploads.values())
    first = requests.post(f"{url}/predict", files=uploads, timeout=1800)
    if first.status_code != 200:
      raise RuntimeError(f"/predict answered {first.status_code}: {first.text[:200]}")
    baseline = _memory_mb(process.pid)["VmRSS"]
    with open(f"/proc/{process.pid}/clear_refs", "w") as f:
      f.write("5")  # Resets VmHWM to the current resident memory.
    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
      statuses = Counter(pool.map(
          lambda _: requests.post(f"{url}/predict", files=uploads, timeout=900).status_code,
          range(clients)))
    seconds = time.perf_counter() - started
    peak = _memory_mb(process.pid)["VmHWM"]
  finally:
    process.terminate()
    process.wait(timeout=120)
  return {"clients": clients, "photo": f"{width}×{height}", "request_bytes": request_bytes,
          "statuses": dict(sorted(statuses.items())), "seconds": round(seconds, 1),
          "baseline_mb": round(baseline), "peak_mb": round(peak),
          "peak_over_baseline_mb": round(peak) - round(baseline)}
