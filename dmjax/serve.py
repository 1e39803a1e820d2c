"""A local web app and HTTP API for a trained run: a page to try photo pairs, and /predict.

  python -m dmjax.serve --workdir=DIR                 # then open http://127.0.0.1:8000
  curl -F bg=@bg.jpg -F fg_bg=@fg_bg.jpg http://127.0.0.1:8000/predict > out.json
  curl -F bg=@bg.jpg -F fg_bg=@fg_bg.jpg "http://127.0.0.1:8000/predict?format=mask" > mask.png

The model is loaded once; every request goes through one model worker that batches what is
waiting (`dmjax.inference.server`, which documents the routes, formats and refusals). Binds
127.0.0.1 (this machine only) unless --host says otherwise; there is no authentication, so
--host=0.0.0.0 lets anyone who can reach the port use the model.
"""

from __future__ import annotations

from collections.abc import Sequence

from absl import flags, logging

from dmjax import cli
from dmjax.inference import CLEAN_MASK_HELP, FIT_HELP, FITS, Predictor

try:
  from dmjax.inference import server
except ImportError as e:  # Starlette, uvicorn or python-multipart missing.
  raise SystemExit(f"error: dmjax-serve needs the `serve` extra ({e}): pip install -c "
                   "constraints.txt -e \".[serve]\"") from None


def define_flags(f: flags.FlagValues, argv: list[str]) -> None:
  del argv
  flags.DEFINE_string("workdir", None, "A training run's workdir.", flag_values=f, required=True)
  flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).", flag_values=f)
  flags.DEFINE_string("host", "127.0.0.1", "Address to listen on (127.0.0.1: this machine only).",
                      flag_values=f)
  flags.DEFINE_integer("port", 8000, "Port to listen on.", lower_bound=0, upper_bound=65535,
                       flag_values=f)
  flags.DEFINE_enum("fit", "auto", FITS, FIT_HELP, flag_values=f)
  flags.DEFINE_bool("clean_mask", True, CLEAN_MASK_HELP, flag_values=f)
  flags.DEFINE_integer("batch_size", 8, "Most pairs per model call.", lower_bound=1,
                       flag_values=f)
  flags.DEFINE_float("max_upload_mb", server.DEFAULT_MAX_UPLOAD_BYTES / 2**20,
                     "Largest request (both photos) in MiB; larger ones get 413.", lower_bound=0.01,
                     flag_values=f)
  flags.DEFINE_float("max_megapixels", server.DEFAULT_MAX_PIXELS / 1e6,
                     "Largest photo in megapixels; larger ones get 413.", lower_bound=0.0001,
                     flag_values=f)
  flags.DEFINE_integer("max_queue", server.DEFAULT_MAX_QUEUE,
                       "Most pairs waiting for the model; more get 503.", lower_bound=1,
                       flag_values=f)
  flags.DEFINE_float("batch_wait_ms", 5.0, "How long the model worker waits after a request for "
                     "others to batch with it.", lower_bound=0.0, flag_values=f)


def serve(f: flags.FlagValues) -> None:
  # Checked before the model loads: a taken port should not cost a minute of loading first.
  sock = server.loopback_socket(f.host, f.port)
  predictor = Predictor.from_workdir(f.workdir, step=f.step, fit=f.fit, batch_size=f.batch_size,
                                     clean_mask=f.clean_mask)
  app = server.create_app(predictor, max_upload_bytes=int(f.max_upload_mb * 2**20),
                          max_pixels=int(f.max_megapixels * 1e6), max_queue=f.max_queue,
                          batch_wait_s=f.batch_wait_ms / 1000)
  about = server.model_description(predictor)
  host, port = sock.getsockname()[:2]
  url = f"http://{f'[{host}]' if ':' in host else host}:{port}"
  if host not in ("127.0.0.1", "::1", "localhost"):
    logging.warning("dmjax-serve: listening on %s: anyone who can reach it can use the model "
                    "(no authentication)", host)
  print(f"dmjax-serve: {about['model']} at checkpoint step {about['step']}: open {url}/ "
        f"(API: POST {url}/predict; Ctrl-C stops)", flush=True)
  server.serve_forever(app, sock)


def main(argv: Sequence[str] | None = None) -> None:
  cli.run(__doc__, define_flags, serve, argv, program="dmjax-serve")


if __name__ == "__main__":
  main()
