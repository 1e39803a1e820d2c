"""The PyTorch side of the `step` rows: the original model (dmjax.models.torch_depthmasknet)
trained with the compare rows' loss and optimizer. torch is imported only when a runner is made."""

from __future__ import annotations

import os

import numpy as np
from absl import logging

from dmjax import errors
from dmjax.benchmark import timing

# The loss and optimizer of the compare rows, the same on the PyTorch side (`torch_bce_dice`,
# torch.optim.SGD): the seed's BCE + Dice, here on both heads, so that neither side is charged
# for a loss the other does not compute.
COMPARE_LOSS = {"mask_bce": 1.0, "mask_dice": 1.0, "depth_l1": 0.0, "depth_ssim": 0.0,
                "depth_edge": 0.0, "depth_bce_dice": 1.0, "dice_per_image": False}
COMPARE_OPTIMIZER = {"name": "sgd", "learning_rate": 0.01, "momentum": 0.9, "weight_decay": 1e-5,
                     "schedule": "step", "step_every": 0, "grad_clip_norm": 0.0}


def torch_bce_dice(logits, target):
  """dmjax's bce_loss + batch-global dice_loss (smooth 1), in PyTorch."""
  import torch  # noqa: PLC0415

  probs = torch.sigmoid(logits)
  dice = 1.0 - (2.0 * (probs * target).sum() + 1.0) / (probs.sum() + target.sum() + 1.0)
  return torch.nn.functional.binary_cross_entropy_with_logits(logits, target) + dice


# PyTorch runners: (bfloat16 autocast, channels-last, torch.compile).
TORCH_VARIANTS = {
    "original": (False, False, False),  # How the original trained: float32, NCHW, eager.
    "best": (True, True, True),  # As well as PyTorch can on a GPU.
    # The same in float32, for CPUs without bfloat16 arithmetic, where autocast slows it down.
    "best_fp32": (False, True, True),
}


class TorchTrainer:
  """dmjax.models.torch_depthmasknet trained with the compare rows' loss and optimizer.

  `variant` is a key of TORCH_VARIANTS. torch.compile is skipped unless `compile`; when it fails
  the runner falls back to eager and says so in its row (`compile`: "compile_failed: ...").
  cudnn.benchmark is on in every variant, as the seed had it.
  """

  def __init__(self, variant: str, batch: dict[str, np.ndarray], *, compile: bool):
    import torch  # noqa: PLC0415

    from dmjax.models import torch_depthmasknet  # noqa: PLC0415

    if variant not in TORCH_VARIANTS:
      raise errors.UserError(f"--torch_variants: unknown {variant!r}; known: "
                             f"{sorted(TORCH_VARIANTS)}")
    self._torch = torch
    self._amp, self._channels_last, use_compile = TORCH_VARIANTS[variant]
    self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    layout = torch.channels_last if self._channels_last else torch.contiguous_format
    model = torch_depthmasknet.DepthMaskNetTorch().to(self.device, memory_format=layout).train()
    self._optimizer = torch.optim.SGD(model.parameters(), lr=COMPARE_OPTIMIZER["learning_rate"],
                                      momentum=COMPARE_OPTIMIZER["momentum"],
                                      weight_decay=COMPARE_OPTIMIZER["weight_decay"])
    # NHWC arrays -> NCHW tensors (channels-last keeps NHWC in memory under the NCHW shape).
    self._inputs = {k: torch.from_numpy(v).permute(0, 3, 1, 2).to(self.device).contiguous(
        memory_format=layout) for k, v in batch.items()}
    self.batch_size = len(batch["bg"])
    self._forward = model
    self.compile = "off"
    if use_compile and compile:
      self._forward = torch.compile(model)
      self.compile = "on"
    if self.device.type == "cuda":
      torch.cuda.reset_peak_memory_stats()
    try:
      self._step()  # Compiles, where torch.compile works.
    except Exception as error:  # noqa: BLE001 -- any failure of the compiler: report, go eager.
      if self._forward is model:
        raise
      logging.warning("torch.compile failed, timing eager PyTorch instead: %s", error)
      self.compile = f"compile_failed: {type(error).__name__}"
      self._forward = model
      self._step()

  def _step(self) -> None:
    torch = self._torch
    self._optimizer.zero_grad(set_to_none=True)
    with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self._amp):
      mask, depth = self._forward(self._inputs["bg"], self._inputs["fg_bg"])
    loss = (torch_bce_dice(mask.float(), self._inputs["mask"])
            + torch_bce_dice(depth.float(), self._inputs["depth"]))
    loss.backward()
    self._optimizer.step()

  def run(self, steps: int) -> None:
    for _ in range(steps):
      self._step()
    if self.device.type == "cuda":
      self._torch.cuda.synchronize()

  def fields(self) -> timing.Row:
    torch = self._torch
    peak = (torch.cuda.max_memory_allocated() / timing.MiB if self.device.type == "cuda" else None)
    return {"torch_version": torch.__version__, "torch_device": str(self.device),
            "torch_threads": torch.get_num_threads(),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "compile": self.compile,
            "dtype": "bfloat16 (autocast)" if self._amp else "float32",
            "channels_last": self._channels_last,
            "torch_peak_memory_mb": None if peak is None else round(peak, 1)}


def torch_runners(batch: dict[str, np.ndarray], *, torch_on: bool, variants, compile: bool,
                  ) -> tuple[list[timing.Runner], list[timing.Row]]:
  """The PyTorch runners, or none and a row that says why."""
  if not torch_on:
    return [], []
  try:
    import torch  # noqa: F401, PLC0415
  except ImportError:
    return [], [{"what": "step", "framework": "torch", "images_per_sec": None,
                 "note": "torch is not installed (pip install -e '.[torch]'): skipped"}]
  runners = []
  for variant in variants:
    trainer = TorchTrainer(variant, batch, compile=compile)
    runners.append(timing.Runner(f"torch_{variant}", trainer.run, trainer.batch_size,
                          {"framework": "torch", "model": "torch_depthmasknet", "variant": variant,
                           "loss": "bce_dice", "optimizer": "sgd", **trainer.fields()}))
  return runners, []
