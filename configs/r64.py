"""Stage 1 of progressive resizing, 64 × 64 — the default run.

  python -m dmjax.main --config=configs/r64.py --workdir=workdirs/r64

On a 2-core CPU with no GPU this builds the synthetic scenes and trains depthmasknet_v2 in about
25 minutes; see the README for the held-out metrics it reaches beside the two data baselines.
Variants, e.g. `configs/r64.py:data=seed,recipe=seed,schedule=full` (see
`dmjax.config.stage_config`): data=synthetic|seed, recipe=default|seed, schedule=cpu|full.
"""

from dmjax import config as dmjax_config


def get_config(arg=None):
  return dmjax_config.stage_config(64, arg)
