"""Models by name. `create_model(config.model)` builds the one a config names.

Every model is a Linen module called as `model.apply(variables, bg, fg_bg, train=...)` on NHWC
float inputs and returns `{"mask": logits, "depth": logits}`, each float32 of shape
(B, H, W, 1); a model may add outputs that only its losses read (u2netp_dual's `mask_sides`,
`depth_sides`). Variables are `{"params", "batch_stats"}`. Input sizes: depthmasknet and
depthmasknet_v2 need H, W divisible by 16, unet_dual by 4, u2netp_dual and two_stage any.

  depthmasknet     seed 002 (SPEC §1), 5,230,720 parameters
  depthmasknet_v2  the project's default, 524,168 parameters
  unet_dual        seed 004 (MODELS.md §1), 3,165,170 parameters
  u2netp_dual      seed 003 (MODELS.md §2), 1,769,306 parameters
  two_stage        seed 001's cascade (MODELS.md §3.3), variant S 5,767,154 parameters
"""

# Importing a model module registers it.
from dmjax.models import depthmasknet, depthmasknet_v2, two_stage, u2netp_dual, unet_dual  # noqa: F401
from dmjax.models.registry import MODELS, create_model, predict_probabilities, train_inputs

__all__ = ["MODELS", "create_model", "predict_probabilities", "train_inputs"]
