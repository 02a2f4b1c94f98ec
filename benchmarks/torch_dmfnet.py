"""DM-FNet in plain PyTorch eager mode: a same-machine timing baseline.

This file exists only so that benchmarks/bench_fuse.py's JAX numbers can be put
next to what the authors' own code path costs on the same machine. It is never
imported by the `dmfnet_jax` package; PyTorch is needed only to run it.

The module trees reproduce the reference state_dict keys (see
$DMFNET_SHARED/parity/README.md), so the reference checkpoints load with
`strict=True`, and the outputs match the reference's golden tensors to 1e-4
(tests/test_bench_torch_dmfnet.py). Layout is NCHW, as in the reference.

`fuse_pair` follows the authors' test script: for t in (5, 10, 20) and for each
source, noise the image, run a FULL UNet pass at batch 1 (six sequential passes,
including the full-resolution blocks and final_conv that Stage II never uses),
then the fusion head, all under torch.no_grad().

  python benchmarks/torch_dmfnet.py --preset reference --size 256 --threads 2
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

TIMESTEPS = (5, 10, 20)
FEAT_SCALES = (2, 5, 8, 11, 14)
PRESETS = {  # UNet constructor arguments
    # The published structure: image_size 160 puts attention in the middle block only.
    "reference": dict(inner_channel=128, norm_groups=32, image_size=160),
    # This repository's shipped model: image_size 256, attention at 16x16 and the middle.
    "shipped": dict(inner_channel=32, norm_groups=8, image_size=256),
}


# ----------------------------------------------------------------------------- Stage I UNet


class PositionalEncoding(nn.Module):
  def __init__(self, dim):
    super().__init__()
    self.dim = dim

  def forward(self, noise_level):  # (B,) or (B, 1) -> (B, dim), sin first
    count = self.dim // 2
    step = torch.arange(count, dtype=noise_level.dtype, device=noise_level.device) / count
    enc = noise_level.reshape(-1, 1) * torch.exp(-math.log(1e4) * step)[None]
    return torch.cat([torch.sin(enc), torch.cos(enc)], dim=-1)


class FeatureWiseAffine(nn.Module):
  def __init__(self, in_channels, out_channels):
    super().__init__()
    self.noise_func = nn.Sequential(nn.Linear(in_channels, out_channels))

  def forward(self, x, emb):
    return x + self.noise_func(emb).view(x.shape[0], -1, 1, 1)


class Block(nn.Module):
  """GroupNorm -> swish -> dropout/identity -> Conv3x3 (keys block.0 and block.3)."""

  def __init__(self, dim, dim_out, groups, dropout=0.0):
    super().__init__()
    self.block = nn.Sequential(
        nn.GroupNorm(groups, dim), nn.SiLU(),
        nn.Dropout(dropout) if dropout else nn.Identity(),
        nn.Conv2d(dim, dim_out, 3, padding=1))

  def forward(self, x):
    return self.block(x)


class ResnetBlock(nn.Module):
  def __init__(self, dim, dim_out, emb_dim, groups, dropout):
    super().__init__()
    self.noise_func = FeatureWiseAffine(emb_dim, dim_out)
    self.block1 = Block(dim, dim_out, groups)
    self.block2 = Block(dim_out, dim_out, groups, dropout)
    self.res_conv = nn.Conv2d(dim, dim_out, 1) if dim != dim_out else nn.Identity()

  def forward(self, x, emb):
    h = self.noise_func(self.block1(x), emb)
    return self.block2(h) + self.res_conv(x)


class SelfAttention(nn.Module):
  """One head over all H*W positions, logits scaled by 1/sqrt(channels)."""

  def __init__(self, channels, groups):
    super().__init__()
    self.norm = nn.GroupNorm(groups, channels)
    self.qkv = nn.Conv2d(channels, 3 * channels, 1, bias=False)
    self.out = nn.Conv2d(channels, channels, 1)

  def forward(self, x):
    b, c, h, w = x.shape
    q, k, v = self.qkv(self.norm(x)).reshape(b, 3 * c, h * w).chunk(3, dim=1)
    attn = torch.softmax(torch.einsum("bci,bcj->bij", q, k) / math.sqrt(c), dim=-1)
    return self.out(torch.einsum("bij,bcj->bci", attn, v).reshape(b, c, h, w)) + x


class ResnetBlocWithAttn(nn.Module):
  def __init__(self, dim, dim_out, emb_dim, groups, dropout, with_attn):
    super().__init__()
    self.res_block = ResnetBlock(dim, dim_out, emb_dim, groups, dropout)
    self.attn = SelfAttention(dim_out, groups) if with_attn else None

  def forward(self, x, emb):
    x = self.res_block(x, emb)
    return self.attn(x) if self.attn is not None else x


class Downsample(nn.Module):
  def __init__(self, dim):
    super().__init__()
    self.conv = nn.Conv2d(dim, dim, 3, stride=2, padding=1)

  def forward(self, x):
    return self.conv(x)


class Upsample(nn.Module):
  def __init__(self, dim):
    super().__init__()
    self.conv = nn.Conv2d(dim, dim, 3, padding=1)

  def forward(self, x):
    return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class UNet(nn.Module):
  """SR3 UNet (in=out=1) predicting x0 from (x_t, g).

  Attention is decided by comparing `attn_res` with `image_size` halved per level
  (the reference quirk), not with the actual input size.
  """

  def __init__(self, inner_channel=128, norm_groups=32, channel_mults=(1, 1, 1, 1, 2),
               attn_res=(16,), res_blocks=2, dropout=0.2, image_size=160):
    super().__init__()
    c = inner_channel
    self.noise_level_mlp = nn.Sequential(
        PositionalEncoding(c), nn.Linear(c, 4 * c), nn.SiLU(), nn.Linear(4 * c, c))
    self.init_conv = nn.Conv2d(1, c, 3, padding=1)
    levels = len(channel_mults)
    res = image_size
    skip_channels = [c]
    pre = c
    downs = []
    for i, mult in enumerate(channel_mults):
      for _ in range(res_blocks):
        downs.append(ResnetBlocWithAttn(pre, c * mult, c, norm_groups, dropout, res in attn_res))
        pre = c * mult
        skip_channels.append(pre)
      if i != levels - 1:
        downs.append(Downsample(pre))
        skip_channels.append(pre)
        res //= 2
    self.downs = nn.ModuleList(downs)
    self.mid = nn.ModuleList([
        ResnetBlocWithAttn(pre, pre, c, norm_groups, dropout, True),
        ResnetBlocWithAttn(pre, pre, c, norm_groups, dropout, False)])
    ups = []
    for i in reversed(range(levels)):
      for _ in range(res_blocks + 1):
        ups.append(ResnetBlocWithAttn(pre + skip_channels.pop(), c * channel_mults[i], c,
                                      norm_groups, dropout, res in attn_res))
        pre = c * channel_mults[i]
      if i != 0:
        ups.append(Upsample(pre))
        res *= 2
    self.ups = nn.ModuleList(ups)
    self.final_conv = Block(pre, 1, norm_groups)

  def forward(self, x, noise_level, feat_need=False):
    """Returns the output, or with feat_need (encoder feats, REVERSED decoder feats, output)."""
    emb = self.noise_level_mlp(noise_level)
    x = self.init_conv(x)
    feats = [x]
    for layer in self.downs:
      x = layer(x, emb) if isinstance(layer, ResnetBlocWithAttn) else layer(x)
      feats.append(x)
    enc = list(feats)
    for layer in self.mid:
      x = layer(x, emb)
    dec = []
    for layer in self.ups:
      if isinstance(layer, ResnetBlocWithAttn):
        x = layer(torch.cat([x, feats.pop()], dim=1), emb)
        dec.append(x)
      else:
        x = layer(x)
    out = self.final_conv(x)
    return (enc, dec[::-1], out) if feat_need else out


def unet_channels(unet: UNet) -> list[int]:
  """Channels of each decoder feature, in the reversed (feature index) order."""
  blocks = [m for m in unet.ups if isinstance(m, ResnetBlocWithAttn)]
  return [b.res_block.block2.block[3].out_channels for b in blocks][::-1]


# ----------------------------------------------------------------------------- Stage II head


def conv_block(dim_in, dim_out):
  """Conv1x1 -> ReLU -> Conv3x3 -> ReLU (keys 0 and 2)."""
  return nn.Sequential(nn.Conv2d(dim_in, dim_out, 1), nn.ReLU(),
                       nn.Conv2d(dim_out, dim_out, 3, padding=1), nn.ReLU())


class TimestepAggregation(nn.Module):
  """decoder.<2i>: the timestep-concatenated features -> dim (keys block.0 and block.2)."""

  def __init__(self, dim_in, dim_out):
    super().__init__()
    self.block = conv_block(dim_in, dim_out)

  def forward(self, x):
    return self.block(x)


class SpatialAttention(nn.Module):
  def __init__(self):
    super().__init__()
    self.sa = nn.Conv2d(2, 1, 7, padding=3, padding_mode="reflect")

  def forward(self, x):
    return self.sa(torch.cat([x.mean(1, keepdim=True), x.amax(1, keepdim=True)], dim=1))


class ChannelAttention(nn.Module):
  def __init__(self, dim, reduction=8):
    super().__init__()
    self.ca = nn.Sequential(nn.Conv2d(dim, dim // reduction, 1), nn.ReLU(),
                            nn.Conv2d(dim // reduction, dim, 1))

  def forward(self, x):
    return self.ca(x.mean((2, 3), keepdim=True))


class PixelAttention(nn.Module):
  def __init__(self, dim):
    super().__init__()
    self.pa2 = nn.Conv2d(2 * dim, dim, 3, padding=1, padding_mode="reflect", groups=dim)

  def forward(self, x, p1):  # channels interleaved [x_0, p1_0, x_1, p1_1, ...]
    return torch.sigmoid(self.pa2(torch.stack([x, p1], dim=2).flatten(1, 2)))


class CrossModalAttention(nn.Module):
  """DEA-Net attention; returns w = s * sigmoid(pa(...)) with s = a + b, as the reference."""

  def __init__(self, dim):
    super().__init__()
    self.sa = SpatialAttention()
    self.ca = ChannelAttention(dim)
    self.pa = PixelAttention(dim)

  def forward(self, s):
    p1 = self.sa(s) + self.ca(s)
    return s * self.pa(s, p1.expand_as(s))


class FusionLevel(nn.Module):
  """decoder.<2i+1>: cross-modal attention, decoding block, and (level >= 2) block1."""

  def __init__(self, dim, dim_out, prev_dim=None):
    super().__init__()
    self.att = CrossModalAttention(dim)
    self.block = conv_block(dim, dim_out)
    self.block1 = conv_block(prev_dim, dim) if prev_dim is not None else None


class OutConv(nn.Module):
  def __init__(self, dim_in, dim_out):
    super().__init__()
    self.conv = nn.Conv2d(dim_in, dim_out, 3, padding=1)

  def forward(self, x):
    return self.conv(x)


def _up2(x):
  return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)


class FusionHead(nn.Module):
  """The three fusion modules, coarse to fine; `dims` = channels per level, coarse first."""

  def __init__(self, dims, timesteps=TIMESTEPS):
    super().__init__()
    self.dims, self.num_steps = list(dims), len(timesteps)
    decoder = []
    for i, d in enumerate(self.dims):
      decoder.append(TimestepAggregation(d * self.num_steps, d))
      d_out = self.dims[i + 1] if i + 1 < len(self.dims) else d
      decoder.append(FusionLevel(d, d_out, self.dims[i - 1] if i >= 2 else None))
    self.decoder = nn.ModuleList(decoder)
    self.rgb_decode2 = OutConv(self.dims[-1], 64)
    self.rgb_decode1 = OutConv(64, 1)

  @classmethod
  def for_unet(cls, unet: UNet, feat_scales=FEAT_SCALES, timesteps=TIMESTEPS):
    channels = unet_channels(unet)
    return cls([channels[s] for s in sorted(feat_scales, reverse=True)], timesteps)

  def forward(self, feats_a, feats_b):
    """feats_a/b: per level (coarse to fine), the list over timesteps of (B, d, h, w)."""
    multi, out = [], None
    for i in range(len(self.dims)):
      agg, level = self.decoder[2 * i], self.decoder[2 * i + 1]
      a, b = (torch.cat(f[i], dim=1) for f in (feats_a, feats_b))
      if self.num_steps > 1:  # reference quirk: one timestep skips the aggregation
        a, b = agg(a), agg(b)
      w = level.att(a + b)
      fea = w * a + (1 - w) * b + a + b
      if i >= 1:
        fea = fea + multi[i - 1]
      if i >= 2:
        fea = fea + _up2(level.block1(multi[i - 2]))
      out = level.block(fea)
      if i + 1 < len(self.dims):
        multi.append(_up2(out))
    x = F.leaky_relu(self.rgb_decode2(out), 0.2)
    return torch.tanh(self.rgb_decode1(x))


# ----------------------------------------------------------------------------- fusing


def sqrt_alphas_cumprod_prev(num_steps=2000, start=1e-6, end=1e-2) -> np.ndarray:
  """The linear schedule's sqrt(concat([1], alphas_cumprod)), float64."""
  betas = np.linspace(start, end, num_steps, dtype=np.float64)
  return np.sqrt(np.append(1.0, np.cumprod(1.0 - betas)))


def fuse_noisy(unet, head, noisy, feat_scales=FEAT_SCALES):
  """Fused image from given UNet inputs: noisy[(source, t)] = (x_t, g), source 0 = MRI.

  One full UNet pass per entry (batch 1 each), then the head, under no_grad.
  """
  order = sorted(range(len(feat_scales)), key=lambda k: -feat_scales[k])
  steps = sorted({t for _, t in noisy})
  feats = {}
  with torch.no_grad():
    for t in steps:
      for src in (0, 1):
        x_t, g = noisy[(src, t)]
        _, dec, _ = unet(x_t, g, feat_need=True)
        feats[(src, t)] = [dec[feat_scales[k]] for k in order]
    per_source = [[[feats[(src, t)][lvl] for t in steps] for lvl in range(len(order))]
                  for src in (0, 1)]
    return head(*per_source)


def fuse_pair(unet, head, a, b, timesteps=TIMESTEPS, generator=None, sqrt_acp_prev=None):
  """The authors' test path: a (MRI) and b, (1, 1, H, W) in [-1, 1] -> fused (1, 1, H, W)."""
  if sqrt_acp_prev is None:
    sqrt_acp_prev = sqrt_alphas_cumprod_prev()
  noisy = {}
  for t in timesteps:
    for src, x0 in enumerate((a, b)):
      lo, hi = float(sqrt_acp_prev[t - 1]), float(sqrt_acp_prev[t])
      g = lo + (hi - lo) * torch.rand(x0.shape[0], 1, generator=generator)
      eps = torch.randn(x0.shape, generator=generator)
      noisy[(src, t)] = (g.view(-1, 1, 1, 1) * x0 + (1 - g**2).sqrt().view(-1, 1, 1, 1) * eps, g)
  return fuse_noisy(unet, head, noisy)


# ----------------------------------------------------------------------------- timing


def orthogonal_init_(model: nn.Module) -> nn.Module:
  """The reference init: orthogonal conv/linear weights (gain 1), zero biases."""
  for m in model.modules():
    if isinstance(m, (nn.Conv2d, nn.Linear)):
      nn.init.orthogonal_(m.weight)
      if m.bias is not None:
        nn.init.zeros_(m.bias)
  return model


def build(inner_channel, norm_groups, image_size_structure):
  unet = UNet(inner_channel, norm_groups, image_size=image_size_structure)
  head = FusionHead.for_unet(unet)
  return orthogonal_init_(unet).eval(), orthogonal_init_(head).eval()


def time_fuse(inner_channel, norm_groups, image_size_structure, size=256, threads=2,
              repeats=3) -> float:
  """Seconds per pair at size x size (median of `repeats`, after one warm-up)."""
  torch.set_num_threads(threads)
  torch.manual_seed(0)
  unet, head = build(inner_channel, norm_groups, image_size_structure)
  a = torch.rand(1, 1, size, size) * 2 - 1
  b = torch.rand(1, 1, size, size) * 2 - 1
  fuse_pair(unet, head, a, b)
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fuse_pair(unet, head, a, b)
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--preset", choices=sorted(PRESETS), default="reference")
  p.add_argument("--size", type=int, default=256)
  p.add_argument("--threads", type=int, default=2)
  p.add_argument("--repeats", type=int, default=3)
  args = p.parse_args()
  preset = PRESETS[args.preset]
  seconds = time_fuse(preset["inner_channel"], preset["norm_groups"], preset["image_size"],
                      size=args.size, threads=args.threads, repeats=args.repeats)
  print(json.dumps(dict(framework="torch-eager", torch=torch.__version__, preset=args.preset,
                        **PRESETS[args.preset], size=args.size, threads=args.threads,
                        repeats=args.repeats, seconds_per_pair=seconds,
                        pairs_per_s=1.0 / seconds)))


if __name__ == "__main__":
  main()
