r"""The PyTorch peer: the same TSN/TSM/SSA ResNet-50 step in PyTorch eager, alternated with JAX.

Runs in a separate environment with PyTorch (the project itself never imports it):

    python3 -m venv .venv-torch
    .venv-torch/bin/pip install torch==2.14.1 torchvision==0.29.1
    .venv-torch/bin/python benchmarks/peer_torch.py --model tsn --batch 2 --frames 8 \
        --crop 112 --rounds 3 [--dtype bfloat16]

Each round times the PyTorch train and inference steps in this process, then runs
`benchmarks/bench.py` with the matching config (`--jax_python`, the project's venv)
in a subprocess on the same input, so that both see the same machine load. It prints
a line per round and, last, a JSON line with the medians and the ratio
`jax_vs_torch_train` = PyTorch step time / JAX step time (above 1: JAX is faster).

The PyTorch side is torchvision's ResNet-50 (TSN: frames folded into the batch,
logits averaged over time; TSM: the residual shift before every block's conv1;
SSA: our PyTorch SSA, below, before conv2 of layer2 blocks 0, 2, layer3 0, 2, 4;
`ssa_port`: the same with its attention weights materialised, as the public SSAN
port computes them), channels_last, SGD with momentum and weight decay, dropout 0.5
before the classifier, denormals flushed, bf16 through `torch.autocast` (oneDNN).
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import numpy as np
import torch
from torch import nn
import torchvision

JAX_CONFIGS = {"tsn": "configs/ssv2_tsn_r50_8f.py", "tsm": "configs/ssv2_tsm_r50_8f.py",
               "ssa": "configs/ssv2_ssa_r50_8f.py", "ssa_port": "configs/ssv2_ssa_r50_8f.py"}
# SSA's places (torchvision names): layer2 blocks 0, 2; layer3 blocks 0, 2, 4.
SSA_PLACEMENT = {"layer2": (0, 2), "layer3": (0, 2, 4)}
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class TemporalShift(nn.Module):
  """TSM's zero-padded shift of 1/fold_div channels each way along T, on (B*T, C, H, W)."""

  def __init__(self, num_frames: int, fold_div: int = 8):
    super().__init__()
    self.num_frames, self.fold_div = num_frames, fold_div

  def forward(self, x):
    bt, c, h, w = x.shape
    x = x.view(bt // self.num_frames, self.num_frames, c, h, w)
    fold = c // self.fold_div
    out = torch.zeros_like(x)
    out[:, :-1, :fold] = x[:, 1:, :fold]
    out[:, 1:, fold:2 * fold] = x[:, :-1, fold:2 * fold]
    out[:, :, 2 * fold:] = x[:, :, 2 * fold:]
    return out.view(bt, c, h, w)


class SeparableSelfAttention(nn.Module):
  """SSA (Guo et al., CVPR 2021) on (B*T, C, H, W), as DESIGN.md describes it.

  Written here from the paper's equations (the public SSAN port is not vendored):
  1x1 q, k, v; per frame `softmax(q k^T) v + v softmax(q^T k)^T`; a 3x1x1 conv of
  that gives `q_hat, k_hat`; `softmax(q_hat k_hat^T)` over frames (flattened to
  H*W*C) applied to the same `v`. Unscaled logits, as in the paper and the JAX
  default. The softmaxes use PyTorch's fused `scaled_dot_product_attention`, or,
  with `fused=False`, a plain `softmax(q k^T) v` whose weights are a tensor kept
  for the backward pass: how the public SSAN port (einsum, `torch.softmax`)
  computes them.
  """

  def __init__(self, channels: int, num_frames: int, fused: bool = True):
    super().__init__()
    self.num_frames, self.fused = num_frames, fused
    self.query, self.key, self.value = (
        nn.Conv2d(channels, channels, 1).to(memory_format=torch.channels_last)
        for _ in range(3))
    self.temporal = nn.Conv3d(channels, 2 * channels, (3, 1, 1), padding=(1, 0, 0))

  def forward(self, x):
    bt, c, h, w = x.shape
    b, t = bt // self.num_frames, self.num_frames
    attend = fused_attention if self.fused else materialised_attention
    q, k, v = (f(x).flatten(2).transpose(1, 2) for f in (self.query, self.key,
                                                          self.value))  # (BT, HW, C)
    x_hat = attend(q, k, v) + attend(q.mT, k.mT, v.mT).mT
    qk_hat = self.temporal(x_hat.reshape(b, t, h, w, c).permute(0, 4, 1, 2, 3))
    clips = lambda a: a.permute(0, 2, 3, 4, 1).reshape(b, t, h * w * c)
    q_hat, k_hat = qk_hat.chunk(2, dim=1)
    y = attend(clips(q_hat), clips(k_hat), v.reshape(b, t, h * w * c))
    return y.reshape(bt, h, w, c).permute(0, 3, 1, 2)  # channels_last strides


def fused_attention(q, k, v):
  return nn.functional.scaled_dot_product_attention(q, k, v, scale=1.0)


def materialised_attention(q, k, v):
  return torch.softmax(q @ k.mT, dim=-1) @ v


def build_model(name: str, num_frames: int, num_classes: int) -> nn.Module:
  model = torchvision.models.resnet50(num_classes=num_classes)
  model.fc = nn.Sequential(nn.Dropout(0.5), model.fc)
  if name == "tsm":
    for layer in (model.layer1, model.layer2, model.layer3, model.layer4):
      for block in layer:
        block.conv1 = nn.Sequential(TemporalShift(num_frames), block.conv1)
  model = model.to(memory_format=torch.channels_last)
  if name in ("ssa", "ssa_port"):  # after conv1+bn1+relu: in front of conv2
    for layer_name, blocks in SSA_PLACEMENT.items():
      for i in blocks:
        block = getattr(model, layer_name)[i]
        block.conv2 = nn.Sequential(
            SeparableSelfAttention(block.conv1.out_channels, num_frames,
                                   fused=name == "ssa"), block.conv2)
  return model


def make_input(batch, frames, crop, num_classes):
  """The clip batch bench.py uses (same generator, seed and order), as (B*T, 3, H, W)."""
  rng = np.random.default_rng(0)
  video = rng.standard_normal((batch, frames, crop, crop, 3), np.float32)
  labels = rng.integers(0, num_classes, (batch,))
  # (B, T, H, W, C) -> (B*T, C, H, W): a view with channels_last strides, no copy.
  x = torch.from_numpy(video).reshape(batch * frames, crop, crop, 3).permute(0, 3, 1, 2)
  return x, torch.from_numpy(labels)


def synchronize(device):
  if device.type == "cuda":
    torch.cuda.synchronize(device)


def time_torch(args):
  """Median seconds of the PyTorch train and inference steps."""
  device = torch.device(args.device)
  model = build_model(args.model, args.frames, args.num_classes).to(device)
  x, labels = (a.to(device) for a in make_input(args.batch, args.frames, args.crop,
                                                args.num_classes))
  opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
  autocast = lambda: torch.autocast(device.type, torch.bfloat16,
                                    enabled=args.dtype == "bfloat16")

  def logits_of(x):
    frame_logits = model(x).float()
    return frame_logits.view(args.batch, args.frames, -1).mean(1)

  def train_step():
    opt.zero_grad(set_to_none=True)
    with autocast():
      loss = nn.functional.cross_entropy(logits_of(x), labels)
    loss.backward()
    opt.step()

  def infer_step():
    with torch.no_grad(), autocast():
      logits_of(x)

  def median_seconds(step):
    for _ in range(args.warmup):
      step()
    synchronize(device)
    times = []
    for _ in range(args.steps):
      start = time.perf_counter()
      step()
      synchronize(device)
      times.append(time.perf_counter() - start)
    return statistics.median(times)

  model.train()
  train_s = median_seconds(train_step)
  model.eval()
  return train_s, median_seconds(infer_step)


def matmul_gflops(dtype, device, n=2048, steps=10):
  a, b = (torch.randn(n, n, dtype=dtype, device=device) for _ in range(2))
  for _ in range(2):
    a @ b
  synchronize(a.device)
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    a @ b
    synchronize(a.device)
    times.append(time.perf_counter() - start)
  return 2 * n**3 / statistics.median(times) / 1e9


def run_jax(args):
  """bench.py's report for the same workload (its last stdout line)."""
  cmd = [args.jax_python, os.path.join(REPO, "benchmarks", "bench.py"),
         f"--config={os.path.join(REPO, JAX_CONFIGS[args.model])}",
         f"--batch={args.batch}", f"--steps={args.steps}", f"--warmup={args.warmup}",
         f"--config.data.num_frames={args.frames}", f"--config.data.crop_size={args.crop}",
         f"--config.model.dtype={args.dtype}", f"--config.model.num_classes={args.num_classes}"]
  out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=REPO).stdout
  return json.loads(out.strip().splitlines()[-1])


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--model", choices=sorted(JAX_CONFIGS), default="tsn")
  parser.add_argument("--batch", type=int, default=2)
  parser.add_argument("--frames", type=int, default=8)
  parser.add_argument("--crop", type=int, default=112)
  parser.add_argument("--num_classes", type=int, default=174)
  parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--rounds", type=int, default=3,
                      help="alternations of PyTorch and JAX; 0 times PyTorch only")
  parser.add_argument("--device", default="cpu",
                      help="torch device, e.g. cuda (device_check.py's peer)")
  parser.add_argument("--jax_python", default=os.path.join(REPO, ".venv", "bin", "python"))
  args = parser.parse_args()

  torch.set_flush_denormal(True)
  rounds = []
  for i in range(max(args.rounds, 1)):
    torch_train_s, torch_infer_s = time_torch(args)
    row = {"torch_train_s": torch_train_s, "torch_infer_s": torch_infer_s}
    if args.rounds:
      jax_report = run_jax(args)
      row.update(jax_train_s=jax_report["train_step_s"],
                 jax_infer_s=jax_report["infer_step_s"],
                 jax_peak_memory_bytes=jax_report["peak_memory_bytes"])
    print(f"round {i}: " + "  ".join(f"{k} {v:.3f}" for k, v in row.items()
                                     if k.endswith("_s")), flush=True)
    rounds.append(row)

  report = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
  if args.rounds:
    report["jax_vs_torch_train"] = report["torch_train_s"] / report["jax_train_s"]
    report["jax_vs_torch_infer"] = report["torch_infer_s"] / report["jax_infer_s"]
  report.update(
      model=args.model, batch=args.batch, frames=args.frames, crop=args.crop,
      dtype=args.dtype, rounds=args.rounds,
      device=args.device,
      torch_matmul_gflops=matmul_gflops(torch.float32, args.device),
      torch_matmul_gflops_bf16=matmul_gflops(torch.bfloat16, args.device),
      torch_max_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
      torch=torch.__version__, threads=torch.get_num_threads())
  print(json.dumps(report), flush=True)


if __name__ == "__main__":
  sys.exit(main())
