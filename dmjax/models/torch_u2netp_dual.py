"""Seed 003's U²-Net-P with depth and seg decoders in PyTorch (MODELS.md §2), with the original's
state-dict key names; written from the specification to check weight import.

Only imported when torch is wanted. forward takes the 6-channel cat([bg, fg_bg]) (NCHW) and
returns the 14 maps in the original's order (depth fused, depth side 1..6, seg fused, seg side
1..6), as logits: the original's sigmoid is left out, as in dmjax.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _up(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
  return F.interpolate(x, size=like.shape[2:], mode="bilinear", align_corners=False)


class REBNCONV(nn.Module):

  def __init__(self, in_ch: int, out_ch: int, dirate: int = 1):
    super().__init__()
    self.conv_s1 = nn.Conv2d(in_ch, out_ch, 3, padding=dirate, dilation=dirate)
    self.bn_s1 = nn.BatchNorm2d(out_ch)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return torch.relu(self.bn_s1(self.conv_s1(x)))


class RSU(nn.Module):
  """RSU-L (L = height)."""

  def __init__(self, height: int, in_ch: int, mid_ch: int, out_ch: int):
    super().__init__()
    self.height = height
    self.rebnconvin = REBNCONV(in_ch, out_ch)
    self.rebnconv1 = REBNCONV(out_ch, mid_ch)
    for k in range(2, height):
      setattr(self, f"rebnconv{k}", REBNCONV(mid_ch, mid_ch))
    setattr(self, f"rebnconv{height}", REBNCONV(mid_ch, mid_ch, dirate=2))
    for k in range(height - 1, 1, -1):
      setattr(self, f"rebnconv{k}d", REBNCONV(2 * mid_ch, mid_ch))
    self.rebnconv1d = REBNCONV(2 * mid_ch, out_ch)
    self.pool = nn.MaxPool2d(2, 2, ceil_mode=True)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    hxin = self.rebnconvin(x)
    hx = [self.rebnconv1(hxin)]
    for k in range(2, self.height):
      hx.append(getattr(self, f"rebnconv{k}")(self.pool(hx[-1])))
    h = getattr(self, f"rebnconv{self.height}")(hx[-1])
    h = getattr(self, f"rebnconv{self.height - 1}d")(torch.cat([h, hx[-1]], 1))
    for k in range(self.height - 2, 0, -1):
      h = getattr(self, f"rebnconv{k}d")(torch.cat([_up(h, hx[k - 1]), hx[k - 1]], 1))
    return h + hxin


class RSU4F(nn.Module):

  def __init__(self, in_ch: int, mid_ch: int, out_ch: int):
    super().__init__()
    self.rebnconvin = REBNCONV(in_ch, out_ch)
    self.rebnconv1 = REBNCONV(out_ch, mid_ch)
    self.rebnconv2 = REBNCONV(mid_ch, mid_ch, 2)
    self.rebnconv3 = REBNCONV(mid_ch, mid_ch, 4)
    self.rebnconv4 = REBNCONV(mid_ch, mid_ch, 8)
    self.rebnconv3d = REBNCONV(2 * mid_ch, mid_ch, 4)
    self.rebnconv2d = REBNCONV(2 * mid_ch, mid_ch, 2)
    self.rebnconv1d = REBNCONV(2 * mid_ch, out_ch)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    hxin = self.rebnconvin(x)
    hx1 = self.rebnconv1(hxin)
    hx2 = self.rebnconv2(hx1)
    hx3 = self.rebnconv3(hx2)
    hx4 = self.rebnconv4(hx3)
    hx3d = self.rebnconv3d(torch.cat([hx4, hx3], 1))
    hx2d = self.rebnconv2d(torch.cat([hx3d, hx2], 1))
    return self.rebnconv1d(torch.cat([hx2d, hx1], 1)) + hxin


def _stage(index: int, in_ch: int) -> nn.Module:
  height = {1: 7, 2: 6, 3: 5, 4: 4}.get(index)
  return RSU4F(in_ch, 16, 64) if height is None else RSU(height, in_ch, 16, 64)


class U2NetPDualTorch(nn.Module):

  def __init__(self):
    super().__init__()
    self.pool = nn.MaxPool2d(2, 2, ceil_mode=True)
    for k in range(1, 7):
      setattr(self, f"stage{k}", _stage(k, 6 if k == 1 else 64))
    for task in ("depth", "seg"):
      for k in range(5, 0, -1):
        setattr(self, f"{task}_stage{k}d", _stage(k, 128))
      for k in range(1, 7):
        setattr(self, f"{task}_side{k}", nn.Conv2d(64, 1, 3, padding=1))
      setattr(self, f"{task}_out", nn.Conv2d(6, 1, 1))

  def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    hx = []
    for k in range(1, 7):
      hx.append(getattr(self, f"stage{k}")(x if k == 1 else self.pool(hx[-1])))
    deepest_up = _up(hx[5], hx[4])
    outputs = []
    for task in ("depth", "seg"):
      h, decoded = deepest_up, {6: hx[5]}
      for k in range(5, 0, -1):
        skip = hx[k - 1]
        h = getattr(self, f"{task}_stage{k}d")(torch.cat([_up(h, skip), skip], 1))
        decoded[k] = h
      sides = [_up(getattr(self, f"{task}_side{k}")(decoded[k]), decoded[1]) for k in range(1, 7)]
      outputs += [getattr(self, f"{task}_out")(torch.cat(sides, 1)), *sides]
    return tuple(outputs)
