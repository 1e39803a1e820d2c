"""Seed 004's shared encoder + two U-Net decoders in PyTorch (MODELS.md §1), with the original's
state-dict key names; written from the specification to check weight import.

Only imported when torch is wanted. Inputs and outputs are NCHW; forward takes the 6-channel
cat([bg, fg_bg]) as the original did and returns its raw (mask, depth) outputs.
"""

from __future__ import annotations

import torch
from torch import nn


class BasicBlock(nn.Module):

  def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
    super().__init__()
    self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(out_channels)
    self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(out_channels)
    self.shortcut = nn.Sequential()
    if stride != 1 or in_channels != out_channels:
      self.shortcut = nn.Sequential(
          nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
          nn.BatchNorm2d(out_channels))

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    out = torch.relu(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    return torch.relu(out + self.shortcut(x))


class Encoder(nn.Module):

  def __init__(self):
    super().__init__()
    self.conv1 = nn.Conv2d(3, 32, 3, 1, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(32)
    self.layer1 = nn.Sequential(BasicBlock(32, 32), BasicBlock(32, 32))
    self.conv2 = nn.Conv2d(3, 32, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(32)
    self.layer2 = nn.Sequential(BasicBlock(32, 32), BasicBlock(32, 32))
    self.layer3 = nn.Sequential(BasicBlock(64, 128, 2), BasicBlock(128, 128))
    self.layer4 = nn.Sequential(BasicBlock(128, 256, 2), BasicBlock(256, 256))

  def forward(self, x: torch.Tensor):
    bg = self.layer1(torch.relu(self.bn1(self.conv1(x[:, :3]))))
    fg_bg = self.layer2(torch.relu(self.bn2(self.conv2(x[:, 3:]))))
    out_1 = torch.cat([bg, fg_bg], dim=1)
    out_2 = self.layer3(out_1)
    return out_1, out_2, self.layer4(out_2)


class UpSample(nn.Module):

  def __init__(self, up_channels: int, skip_channels: int, out_channels: int, activation):
    super().__init__()
    self.up = nn.ConvTranspose2d(up_channels, up_channels, 2, 2)
    self.convA = nn.Conv2d(up_channels + skip_channels, out_channels, 3, 1, 1)
    self.reluA = activation()
    self.convB = nn.Conv2d(out_channels, out_channels, 3, 1, 1)
    self.reluB = activation()

  def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
    x = torch.cat([self.up(x), skip], dim=1)
    return self.reluB(self.convB(self.reluA(self.convA(x))))


class Decoder(nn.Module):

  def __init__(self, features: int, activation):
    super().__init__()
    self.conv2 = nn.Conv2d(256, features, 1)
    self.up1 = UpSample(features, 128, features // 2, activation)
    self.up2 = UpSample(features // 2, 64, features // 4, activation)
    self.conv3 = nn.Conv2d(features // 4, 1, 3, 1, 1)

  def forward(self, out_1, out_2, out_4) -> torch.Tensor:
    x = self.up2(self.up1(self.conv2(out_4), out_2), out_1)
    return self.conv3(x)


class UNetDualTorch(nn.Module):
  """forward(cat([bg, fg_bg])) -> (mask, depth), each (B, 1, H, W), raw."""

  def __init__(self, leaky: bool = True):
    super().__init__()
    activation = (lambda: nn.LeakyReLU(0.2)) if leaky else nn.ReLU
    self.encoder = Encoder()
    self.decoder_m = Decoder(64, activation)
    self.decoder_d = Decoder(128, activation)

  def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    features = self.encoder(x)
    return self.decoder_m(*features), self.decoder_d(*features)
