"""Stage 3 of progressive resizing, 192 × 192 (the original data's own size), from stage 2.

  python -m dmjax.main --config=configs/r192.py --workdir=workdirs/r192 \
      --config.init_from=workdirs/r112

A fresh optimizer and schedule. Variants as in configs/r64.py: data=synthetic|original,
recipe=default|original, schedule=cpu|full.
"""

from dmjax import config as dmjax_config


def get_config(arg=None):
  return dmjax_config.stage_config(192, arg)
