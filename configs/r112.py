"""Stage 2 of progressive resizing, 112 × 112, starting from stage 1's final parameters.

  python -m dmjax.main --config=configs/r112.py --workdir=workdirs/r112 \
      --config.init_from=workdirs/r64

A fresh optimizer and schedule (the original kept decaying its rate across stages to ≈ 1e-8).
Variants as in configs/r64.py: data=synthetic|original, recipe=default|original,
schedule=cpu|full.
"""

from dmjax import config as dmjax_config


def get_config(arg=None):
  return dmjax_config.stage_config(112, arg)
