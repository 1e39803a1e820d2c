"""The original DepthMaskNet (seed 002, SPEC §1) in PyTorch, with its state-dict key names.

Used to check weight import (`dmjax.import_torch`) and as the PyTorch side of the benchmark.
Only imported when torch is wanted: nothing else in dmjax imports this module.
Inputs and outputs are NCHW, as in the original.
"""

from __future__ import annotations

import torch
from torch import nn

STEM_FEATURES = 32
ENCODER_FEATURES = (64, 128, 256, 512)


def _conv_bn_relu(in_channels: int, out_channels: int) -> nn.Sequential:
  # Keys: .0 conv, .1 BatchNorm (the stems and the normal branch).
  return nn.Sequential(
      nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
      nn.BatchNorm2d(out_channels),
      nn.ReLU(),
  )


class NormalDilatedConv(nn.Module):

  def __init__(self, in_channels: int, out_channels: int):
    super().__init__()
    self.normalconv = _conv_bn_relu(in_channels, out_channels)
    # Keys: .0 conv, .2 BatchNorm; ReLU before BatchNorm as in the original.
    self.dilatedconv = nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=2, dilation=2, bias=False),
        nn.ReLU(),
        nn.BatchNorm2d(out_channels),
    )
    # Capitalised as in the original, whose state-dict keys this must reproduce.
    self.Pointwise = nn.Conv2d(2 * out_channels, out_channels, 1, bias=False)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    both = torch.cat([self.normalconv(x), self.dilatedconv(x)], dim=1)
    return self.Pointwise(both)


class SuperRes(nn.Module):

  def __init__(self, channels: int):
    super().__init__()
    self.Pointwise = nn.Conv2d(channels, 2 * channels, 1, bias=False)
    self.shuffle = nn.PixelShuffle(2)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.shuffle(self.Pointwise(x))


class DepthMaskNetTorch(nn.Module):
  """forward(bg, fg_bg) on NCHW tensors -> (mask_logits, depth_logits), each (B, 1, H, W)."""

  def __init__(self):
    super().__init__()
    self.bg = _conv_bn_relu(3, STEM_FEATURES)
    self.bg_fg = _conv_bn_relu(3, STEM_FEATURES)
    self.pointwise = nn.Conv2d(2 * STEM_FEATURES, STEM_FEATURES, 1, bias=False)
    in_channels = STEM_FEATURES
    for k, out_channels in enumerate(ENCODER_FEATURES, start=1):
      setattr(self, f"encode{k}", NormalDilatedConv(in_channels, out_channels))
      in_channels = out_channels
    self.pool = nn.MaxPool2d(2, 2)
    for task in ("mask", "depth"):
      channels = ENCODER_FEATURES[-1]
      for k in range(1, len(ENCODER_FEATURES) + 1):
        setattr(self, f"{task}_decode{k}", SuperRes(channels))
        channels //= 2
      setattr(self, f"{task}_outputConv", nn.Conv2d(channels, 1, 3, padding=1, bias=False))

  def _head(self, task: str, x: torch.Tensor) -> torch.Tensor:
    for k in range(1, len(ENCODER_FEATURES) + 1):
      x = getattr(self, f"{task}_decode{k}")(x)
    return getattr(self, f"{task}_outputConv")(x)

  def forward(self, bg: torch.Tensor, fg_bg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = self.pointwise(torch.cat([self.bg(bg), self.bg_fg(fg_bg)], dim=1))
    for k in range(1, len(ENCODER_FEATURES) + 1):
      x = self.pool(getattr(self, f"encode{k}")(x))
    return self._head("mask", x), self._head("depth", x)
