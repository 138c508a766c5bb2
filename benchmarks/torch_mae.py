"""The MAE pretraining step in PyTorch: the peer that gpu.sh times beside mae_jax's.

  python benchmarks/torch_mae.py --variants B/16,L/16 --batches 256,128 [--json OUT.json]

A compact MAE written for this benchmark with the reference architecture (He et al. 2022,
facebookresearch/mae's models_mae.py, as DESIGN.md describes it), parameter names as the
official state dict has them, so `python -m mae_jax.export SRC DST --format official` loads
into it: tests/test_torch_peer.py checks it gives mae_jax's loss for the same weights, images
and noise (float32, CPU). The timed step is the reference's: bfloat16 autocast, PyTorch's
scaled_dot_product_attention (flash / cuDNN kernels on GPUs), AdamW (0.9, 0.95) with weight
decay 0.05 on the >= 2-D parameters, median of --repeats x --steps steps. With --json, the
times go to a file that gpu.py reads to print mae_jax's step next to this one.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# Width, depth, heads of the paper's encoders; every variant has the paper's decoder.
VARIANTS = {"B/16": (768, 12, 12), "L/16": (1024, 24, 16), "H/14": (1280, 32, 16)}


class Block(nn.Module):
  """Pre-norm transformer block: fused qkv with bias, exact GELU, MLP ratio 4."""

  def __init__(self, dim: int, heads: int, eps: float):
    super().__init__()
    self.heads = heads
    self.norm1 = nn.LayerNorm(dim, eps=eps)
    self.attn = nn.Module()
    self.attn.qkv = nn.Linear(dim, 3 * dim)
    self.attn.proj = nn.Linear(dim, dim)
    self.norm2 = nn.LayerNorm(dim, eps=eps)
    self.mlp = nn.Module()
    self.mlp.fc1 = nn.Linear(dim, 4 * dim)
    self.mlp.fc2 = nn.Linear(4 * dim, dim)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    b, n, d = x.shape
    qkv = self.attn.qkv(self.norm1(x)).reshape(b, n, 3, self.heads, d // self.heads)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each [B, H, N, Dh]
    attended = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
    x = x + self.attn.proj(attended)
    return x + self.mlp.fc2(F.gelu(self.mlp.fc1(self.norm2(x))))


def sincos_2d(dim: int, grid: int) -> torch.Tensor:
  """[1 + grid^2, dim] fixed position embeddings with a zero cls row; the first half of each
  row encodes the patch's column, the second half its row (the reference's order)."""
  omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
  rows, cols = torch.meshgrid(torch.arange(grid, dtype=torch.float64),
                              torch.arange(grid, dtype=torch.float64), indexing="ij")
  parts = []
  for pos in (cols.reshape(-1), rows.reshape(-1)):
    angles = pos[:, None] * omega[None]  # [N, dim / 4]
    parts += [torch.sin(angles), torch.cos(angles)]
  emb = torch.cat(parts, dim=1).float()
  return torch.cat([torch.zeros(1, dim), emb])


class MAE(nn.Module):
  """Masked autoencoder: ViT encoder on the kept patches, a light decoder over all of them."""

  def __init__(self, image_size: int = 224, patch_size: int = 16, channels: int = 3,
               width: int = 768, depth: int = 12, heads: int = 12, decoder_width: int = 512,
               decoder_depth: int = 8, decoder_heads: int = 16, mask_ratio: float = 0.75,
               norm_pix_loss: bool = True, eps: float = 1e-6):
    super().__init__()
    self.patch_size, self.mask_ratio, self.norm_pix_loss = patch_size, mask_ratio, norm_pix_loss
    grid = image_size // patch_size
    self.patch_embed = nn.Module()
    self.patch_embed.proj = nn.Conv2d(channels, width, patch_size, patch_size)
    self.cls_token = nn.Parameter(torch.zeros(1, 1, width).normal_(std=0.02))
    self.pos_embed = nn.Parameter(sincos_2d(width, grid)[None], requires_grad=False)
    self.blocks = nn.ModuleList(Block(width, heads, eps) for _ in range(depth))
    self.norm = nn.LayerNorm(width, eps=eps)
    self.decoder_embed = nn.Linear(width, decoder_width)
    self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_width).normal_(std=0.02))
    self.decoder_pos_embed = nn.Parameter(sincos_2d(decoder_width, grid)[None],
                                          requires_grad=False)
    self.decoder_blocks = nn.ModuleList(Block(decoder_width, decoder_heads, eps)
                                        for _ in range(decoder_depth))
    self.decoder_norm = nn.LayerNorm(decoder_width, eps=eps)
    self.decoder_pred = nn.Linear(decoder_width, patch_size ** 2 * channels)

  def patchify(self, images: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, N, p*p*C], each patch in (row, column, channel) order."""
    b, c, h, w = images.shape
    p = self.patch_size
    x = images.reshape(b, c, h // p, p, w // p, p)
    return torch.einsum("nchpwq->nhwpqc", x).reshape(b, (h // p) * (w // p), p * p * c)

  def forward(self, images: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
    """The masked MSE loss of `images` [B, C, H, W]; the kept patches are the
    int(N * (1 - mask_ratio)) with the smallest `noise` [B, N] (uniform when not given)."""
    x = self.patch_embed.proj(images).flatten(2).transpose(1, 2)  # [B, N, D]
    b, n, d = x.shape
    x = x + self.pos_embed[:, 1:]
    keep = int(n * (1 - self.mask_ratio))
    if noise is None:
      noise = torch.rand(b, n, device=images.device)
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    x = torch.gather(x, 1, ids_shuffle[:, :keep, None].expand(-1, -1, d))  # [B, keep, D]
    mask = torch.ones(b, n, device=images.device)
    mask[:, :keep] = 0
    mask = torch.gather(mask, 1, ids_restore)  # [B, N], 1 = removed
    cls = (self.cls_token + self.pos_embed[:, :1]).expand(b, -1, -1)
    x = torch.cat([cls, x], dim=1)
    for block in self.blocks:
      x = block(x)
    x = self.decoder_embed(self.norm(x))  # [B, 1 + keep, Dd]
    tokens = torch.cat([x[:, 1:], self.mask_token.expand(b, n - keep, -1)], dim=1)
    tokens = torch.gather(tokens, 1, ids_restore[..., None].expand(-1, -1, x.shape[-1]))
    x = torch.cat([x[:, :1], tokens], dim=1) + self.decoder_pos_embed
    for block in self.decoder_blocks:
      x = block(x)
    pred = self.decoder_pred(self.decoder_norm(x))[:, 1:]  # [B, N, p*p*C]
    target = self.patchify(images)
    if self.norm_pix_loss:
      mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
      target = (target - mean) / (var + 1e-6) ** 0.5
    loss = ((pred.float() - target) ** 2).mean(-1)
    return (loss * mask).sum() / mask.sum()


def make(variant: str, **overrides) -> MAE:
  width, depth, heads = VARIANTS[variant]
  return MAE(**{"width": width, "depth": depth, "heads": heads, **overrides})


def time_step(variant: str, batch: int, repeats: int, steps: int) -> float:
  """Median seconds per training step (forward, backward, AdamW) on the GPU, bf16 autocast."""
  torch.manual_seed(0)
  model = make(variant).cuda().train()
  params = [p for p in model.parameters() if p.requires_grad]
  groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": 0.05},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
  opt = torch.optim.AdamW(groups, lr=1e-4, betas=(0.9, 0.95))
  images = torch.randn(batch, 3, 224, 224, device="cuda")

  def step():
    with torch.autocast("cuda", dtype=torch.bfloat16):
      loss = model(images)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)

  for _ in range(3):  # warm-up: kernel selection, allocator
    step()
  times = []
  for _ in range(repeats):
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
      step()
    torch.cuda.synchronize()
    times.append((time.perf_counter() - start) / steps)
  return float(np.median(times))


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--variants", default="B/16,L/16")
  parser.add_argument("--batches", default="256,128")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--json", help="write {variant: {batch, step_s}} here")
  args = parser.parse_args()
  if not torch.cuda.is_available():
    sys.exit("torch_mae.py times on a GPU; this torch sees none")
  torch.backends.cuda.matmul.allow_tf32 = True
  print(f"PyTorch {torch.__version__}, {torch.cuda.get_device_name()}", flush=True)
  out = {}
  for variant, batch in zip(args.variants.split(","), map(int, args.batches.split(","))):
    try:
      step_s = time_step(variant, batch, args.repeats, args.steps)
    except torch.cuda.OutOfMemoryError as e:
      print(f"  {variant} batch {batch}: out of memory ({str(e).splitlines()[0][:100]})")
      continue
    finally:
      torch.cuda.empty_cache()
    out[variant] = {"batch": batch, "step_s": step_s}
    print(f"  PyTorch MAE {variant} batch {batch}: {step_s * 1e3:.1f} ms  "
          f"{batch / step_s:.1f} images/s", flush=True)
    if args.json:  # after each variant: a run cut short keeps what it finished
      with open(args.json, "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
  main()
