"""A local web app and HTTP API for a trained run: a page to try photo pairs, and /predict.

  python -m dmjax.serve --workdir=DIR                 # then open http://127.0.0.1:8000
  python -m dmjax.serve --exported=MODEL.jaxexport    # a dmjax.export file, no model code
  curl -F bg=@bg.jpg -F fg_bg=@fg_bg.jpg http://127.0.0.1:8000/predict > out.json
  curl -F bg=@bg.jpg -F fg_bg=@fg_bg.jpg "http://127.0.0.1:8000/predict?format=mask" > mask.png

The model is loaded once; every request goes through one model worker that batches what is
waiting (`dmjax.inference.server`, which documents the routes, formats and refusals). With
--warm_up the model's working sizes compile before /health says ready (requests get 503 until
then), so that no photo size stalls the clients later; compiled programs are kept in JAX's
persistent compilation cache (--nocompilation_cache: not), so a second start compiles nothing.

Binds 127.0.0.1 (this machine only) unless --host says otherwise, and answers only requests
addressed to its own names (127.0.0.1, localhost, --host, --allowed_hosts) from its own page or
from clients that are not web pages: another web site's page cannot use it. There is no
authentication, so --host=0.0.0.0 lets anyone who can reach the port use the model.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from absl import flags, logging

from dmjax import cli, errors
from dmjax.inference import CLEAN_MASK_HELP, FIT_HELP, FITS, Predictor

try:
  from dmjax.inference import server
except ImportError as e:  # Starlette, uvicorn or python-multipart missing.
  raise SystemExit(f"error: dmjax-serve needs the `serve` extra ({e}): pip install -c "
                   "constraints.txt -e \".[serve]\"") from None


def define_flags(f: flags.FlagValues, argv: list[str]) -> None:
  del argv
  flags.DEFINE_string("workdir", None, "A training run's workdir.", flag_values=f)
  flags.DEFINE_string("exported", None, "Instead of --workdir: a file from dmjax.export (a "
                      "file exported at a fixed size runs fit=resize).", flag_values=f)
  flags.mark_flags_as_mutual_exclusive(["workdir", "exported"], required=True, flag_values=f)
  flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).", flag_values=f)
  flags.DEFINE_string("host", "127.0.0.1", "Address to listen on (127.0.0.1: this machine only).",
                      flag_values=f)
  flags.DEFINE_integer("port", 8000, "Port to listen on.", lower_bound=0, upper_bound=65535,
                       flag_values=f)
  flags.DEFINE_list("allowed_hosts", [], "Other names this server is reached by (the Host of "
                    "its URL, e.g. a LAN name); requests to any other name get 421. '*': any.",
                    flag_values=f)
  flags.DEFINE_enum("fit", "auto", FITS, FIT_HELP, flag_values=f)
  flags.DEFINE_bool("clean_mask", True, CLEAN_MASK_HELP, flag_values=f)
  flags.DEFINE_integer("batch_size", 8, "Most pairs per model call.", lower_bound=1,
                       flag_values=f)
  flags.DEFINE_bool("warm_up", False, "Compile the model's working sizes before /health says "
                    "ready (requests get 503 until then).", flag_values=f)
  cli.define_compilation_cache_flag(f)
  flags.DEFINE_float("max_upload_mb", server.DEFAULT_MAX_UPLOAD_BYTES / 2**20,
                     "Largest request (all its photos) in MiB; larger ones get 413.",
                     lower_bound=0.01, flag_values=f)
  flags.DEFINE_float("max_megapixels", server.DEFAULT_MAX_PIXELS / 1e6,
                     "Largest photo in megapixels; larger ones get 413.", lower_bound=0.0001,
                     flag_values=f)
  flags.DEFINE_integer("max_queue", server.DEFAULT_MAX_QUEUE,
                       "Most pairs waiting for the model; more get 503.", lower_bound=1,
                       flag_values=f)
  flags.DEFINE_integer("max_reading", server.DEFAULT_MAX_READING,
                       "Most requests read and decoded at once; the others wait for a slot "
                       "(503 after 30 s).", lower_bound=1, flag_values=f)
  flags.DEFINE_integer("max_decoding", server.DEFAULT_MAX_DECODING,
                       "Of those, most whose photos are decoded at once (about 20 bytes a pixel "
                       "each while decoding).", lower_bound=1, flag_values=f)
  flags.DEFINE_integer("max_encoding", server.DEFAULT_MAX_ENCODING,
                       "Most answers made into PNGs at once.", lower_bound=1, flag_values=f)
  flags.DEFINE_float("read_timeout_s", server.DEFAULT_READ_TIMEOUT_S,
                     "Seconds for a request's whole body to arrive; a slower one gets 408.",
                     lower_bound=0.1, flag_values=f)
  flags.DEFINE_integer("max_connections", server.DEFAULT_MAX_CONNECTIONS,
                       "Most connections at once; uvicorn answers 503 past them.", lower_bound=1,
                       flag_values=f)
  flags.DEFINE_float("batch_wait_ms", 5.0, "How long the model worker waits after a request for "
                     "others to batch with it.", lower_bound=0.0, flag_values=f)


def load_predictor(f: flags.FlagValues) -> tuple[Predictor, str]:
  """The model the flags name, and its source (workdir or file) for /health."""
  if f.exported is None:
    return Predictor.from_workdir(f.workdir, step=f.step, fit=f.fit, batch_size=f.batch_size,
                                  clean_mask=f.clean_mask), f.workdir
  if f.step is not None:
    raise errors.UserError("--step is for --workdir; an exported file holds one checkpoint")
  return Predictor.from_exported(f.exported, fit=f.fit, batch_size=f.batch_size,
                                 clean_mask=f.clean_mask), f.exported


def make_app(f: flags.FlagValues):
  """The app the flags describe, its model loaded (and warmed up once served, with
  --warm_up)."""
  cli.use_compilation_cache(f.compilation_cache)
  predictor, source = load_predictor(f)
  return server.create_app(
      predictor, max_upload_bytes=int(f.max_upload_mb * 2**20),
      max_pixels=int(f.max_megapixels * 1e6), max_queue=f.max_queue, max_reading=f.max_reading,
      max_decoding=f.max_decoding, max_encoding=f.max_encoding, read_timeout_s=f.read_timeout_s,
      hosts=server.allowed_hosts(f.host, f.allowed_hosts),
      source=source, warm_up=predictor.warm_up if f.warm_up else None,
      batch_wait_s=f.batch_wait_ms / 1000)


def serve(f: flags.FlagValues) -> None:
  # Checked before the model loads: a taken port should not cost a minute of loading first.
  sock = server.loopback_socket(f.host, f.port)
  try:
    app = make_app(f)
  except BaseException:
    sock.close()
    raise
  about = server.model_description(app.state.worker.predictor,
                                   f.workdir if f.exported is None else f.exported)
  host, port = sock.getsockname()[:2]
  url = f"http://{f'[{host}]' if ':' in host else host}:{port}"
  if host not in ("127.0.0.1", "::1", "localhost"):
    logging.warning("dmjax-serve: listening on %s: anyone who can reach it can use the model "
                    "(no authentication)", host)
  warming = " (warming up: /health says when it is ready)" if f.warm_up else ""
  print(f"dmjax-serve: {about['model']} at checkpoint step {about['step']} "
        f"({os.path.basename(os.path.normpath(f.workdir or f.exported))}): open {url}/ "
        f"(API: POST {url}/predict; Ctrl-C stops){warming}", flush=True)
  server.serve_forever(app, sock, max_connections=f.max_connections)


def main(argv: Sequence[str] | None = None) -> None:
  cli.run(__doc__, define_flags, serve, argv, program="dmjax-serve")


if __name__ == "__main__":
  main()
