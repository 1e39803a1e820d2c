"""Stage 1 of progressive resizing: the model at 64 × 64, refined to 128 — the default run.

  python -m dmjax.main --config=configs/r64.py --workdir=workdirs/r64

On a 2-core CPU with no GPU (25–35 min by machine, data build included) this renders the
scenes at 160 px, trains depthmasknet_v2 at 64 px inside a refined model at 128 px
(dmjax.models.refiner) for 2,600 steps, reaching on the held-out rooms mask IoU 0.88 at 128 px
(per image 0.80; |fg_bg - bg| baseline: 0.51) and depth RMSE 0.079 (training-mean baseline:
0.122; 0.037 against 0.092 after scale-and-shift alignment, δ1 0.94); at other photo sizes see
README "Photos of any size".
Variants, e.g. `configs/r64.py:data=original,recipe=original,schedule=full` (see
`dmjax.config.stage_config`).
"""

from dmjax import config as dmjax_config


def get_config(arg=None):
  return dmjax_config.stage_config(64, arg)
