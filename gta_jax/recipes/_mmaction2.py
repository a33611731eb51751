"""mmaction2's Kinetics-400 ResNet-50 models, as its released configs build them.

One function per model zoo config (open-mmlab/mmaction2, `configs/recognition/`),
for the recipes `k400_*_mmaction2` and `python -m gta_jax.convert --source=mmaction2`
(docs/pretrained.md, "Video checkpoints"). What the configs set and the network
here follows:

* the backbone: `ResNet`/`ResNetTSM` (2D, torchvision's v1.5 bottleneck) or
  `ResNet3d`/`ResNet3dSlowOnly` (conv1 of inflated blocks 3x1x1, the stem kernel,
  its temporal stride and the I3D temporal max-pools), BN eps 1e-5;
* `ResNetTSM(shift_div=8, shift_place='blockres')`: the residual shift in every
  block; `non_local` in blocks 0, 2 of layer2 and 0, 2, 4 of layer3 with
  `NonLocal3d(mode='embedded_gaussian', sub_sample=True, use_scale=False)`;
* the heads: TSN/TSM average consensus over segments, I3D's pooling over
  `(T, H, W)`; the dropout of each config;
* the data: ImageNet mean/std on 0..255 RGB (`ActionDataPreprocessor`, the
  project's `transforms.IMAGENET_MEAN/STD`), 224px crops of frames whose short
  side is 256, the configs' sampling (segments, or clip_len x frame_interval);
* classes: the 400 of `tools/data/kinetics/label_map_k400.txt`, which is the
  sorted list of labels, the order of this project's `kinetics400` builder.

The training settings are the configs' (SGD, their learning rates per batch,
step schedules, warm-up, gradient clipping, TSM's x5 fc learning rate).
"""

import ml_collections

from gta_jax import config_lib

# model.nl for mmaction2's `non_local=((0,0,0), (1,0,1,0), (1,0,1,0,1,0), (0,0,0))`.
NONLOCAL_PLACEMENT = "res3:0,2;res4:0,2,4"


def _schedule(c: ml_collections.ConfigDict, *, epochs: int, lr: float, batch: int,
              milestones, warmup_epochs: int = 0, clip: float = 40.0) -> None:
  """SGD 0.9, wd 1e-4, lr `lr` per `batch` clips, x0.1 at `milestones` (epochs)."""
  c.batch_size = batch
  c.optim.name = "sgd"
  c.optim.momentum = 0.9
  c.optim.nesterov = False
  c.optim.weight_decay = 1e-4
  c.optim.base_lr = lr
  c.optim.lr_batch_size = batch
  c.optim.schedule = "step"
  c.optim.step_boundaries = tuple(m / epochs for m in milestones)
  c.optim.step_factor = 0.1
  c.optim.grad_clip_norm = clip
  c.optim.fc_lr_mult = 1.0
  c.total_steps = config_lib.epochs_to_steps(epochs, c.data.dataset, batch)
  c.optim.warmup_steps = config_lib.epochs_to_steps(warmup_epochs, c.data.dataset, batch)


def tsn_r50(num_segments: int = 3) -> ml_collections.ConfigDict:
  """`tsn_imagenet-pretrained-r50_8xb32-1x1x3-100e_kinetics400-rgb`: TSNHead with
  dropout 0.4; SGD 0.01 per 256 clips, 100 epochs, x0.1 at 40 and 80, clip 40."""
  c = config_lib.k400_config(num_segments, "")
  c.model.dropout_rate = 0.4
  _schedule(c, epochs=100, lr=0.01, batch=256, milestones=(40, 80))
  c.eval.num_clips, c.eval.num_crops = 1, 1  # val: the 3 segments, centre crop
  return c


def tsm_r50(nonlocal_blocks: bool = False) -> ml_collections.ConfigDict:
  """`tsm_imagenet-pretrained-r50[-nl-embedded-gaussian]_8xb16-1x1x8-50e_kinetics400
  -rgb`: TSMHead with dropout 0.5; SGD 0.02 per 128 clips, 50 epochs, 5 of linear
  warm-up, x0.1 at 25 and 45, clip 20, fc lr x5."""
  c = config_lib.k400_config(8, "tsm,nl" if nonlocal_blocks else "tsm")
  c.model.dropout_rate = 0.5
  c.model.tsm.placement = "all"
  c.model.tsm.fold_div = 8
  if nonlocal_blocks:
    c.model.nl.placement = NONLOCAL_PLACEMENT
    c.model.nl.kind = "3d"
    c.model.nl.reduction = 2
    c.model.nl.scaled = False
    c.model.nl.sub_sample = True
    c.model.nl.temporal_position = "none"
  _schedule(c, epochs=50, lr=0.02, batch=128, milestones=(25, 45), warmup_epochs=5,
            clip=20.0)
  c.optim.fc_lr_mult = 5.0
  c.eval.num_clips, c.eval.num_crops = 1, 1  # val: the 8 segments, centre crop
  return c


def _resnet3d(clip_len: int, frame_interval: int) -> ml_collections.ConfigDict:
  c = config_lib.k400_3d_config(clip_len, frame_interval)
  c.model.dropout_rate = 0.5
  c.eval.num_clips, c.eval.num_crops = 10, 3  # test: 10 clips x 3 crops
  return c


def i3d_r50() -> ml_collections.ConfigDict:
  """`i3d_imagenet-pretrained-r50_8xb8-32x2x1-100e_kinetics400-rgb`: 32 frames, 1 in
  2; stem 5x7x7 with temporal stride 2, stem max-pool temporal stride 2, a (2,1,1)
  max-pool after res2, conv1 3x1x1 in the blocks `inflate=((1,1,1), (1,0,1,0),
  (1,0,1,0,1,0), (0,1,0))`; I3DHead dropout 0.5; SGD 0.01 per 64 clips, 100
  epochs, x0.1 at 40 and 80, clip 40."""
  c = _resnet3d(32, 2)
  c.model.resnet3d.update(dict(
      inflate="res2:all;res3:0,2;res4:0,2,4;res5:1", stem_temporal_kernel=5,
      stem_temporal_stride=2, pool1_temporal_stride=2, pool2=True))
  _schedule(c, epochs=100, lr=0.01, batch=64, milestones=(40, 80))
  return c


def slowonly_r50() -> ml_collections.ConfigDict:
  """`slowonly_imagenet-pretrained-r50_8xb16-8x8x1-steplr-150e_kinetics400-rgb`:
  8 frames, 1 in 8; stem 1x7x7 without temporal strides, no pool2, conv1 3x1x1 in
  every block of res4 and res5; I3DHead dropout 0.5; SGD 0.02 per 128 clips, 150
  epochs, 10 of linear warm-up, x0.1 at 90 and 130, clip 40."""
  c = _resnet3d(8, 8)
  c.model.resnet3d.update(dict(
      inflate="res4:all;res5:all", stem_temporal_kernel=1, stem_temporal_stride=1,
      pool1_temporal_stride=1, pool2=False))
  _schedule(c, epochs=150, lr=0.02, batch=128, milestones=(90, 130), warmup_epochs=10)
  return c


# The workdirs docs/pretrained.md's convert commands write, by backbone.
CONVERTED_RUNS = {"tsn": "runs/mmaction2_tsn_r50_k400", "tsm": "runs/mmaction2_tsm_r50_k400"}


def finetune_from(method: str, backbone: str) -> ml_collections.ConfigDict:
  """GTA or SSA on Kinetics-400 (8 segments), started from a converted mmaction2
  TSN or TSM ResNet-50 (`config.init_from`, the run `CONVERTED_RUNS` names).

  Every backbone variable and the 400-way classifier come from the run; the new
  modules start fresh (`config.init_reinit`), as the identity on the backbone's
  features: GTA's output BatchNorm scale is 0 (its default), and SSA uses its
  residual switch (`x + BN(y)`, scale 0) instead of the paper's replacement of
  conv1's feature, which would start far from the trained function. From TSM the
  shift stays in every block (the weights were trained with it). The schedule is
  ours, not measured: the method's recipe for 10 epochs at lr 0.001 per 64 clips
  (a tenth of training from ImageNet), 1 epoch of warm-up.
  """
  if method not in ("gta", "ssa") or backbone not in CONVERTED_RUNS:
    raise ValueError(f"finetune_from: method gta|ssa and backbone "
                     f"{'|'.join(CONVERTED_RUNS)}, got {method!r}, {backbone!r}")
  modules = f"tsm,{method}" if backbone == "tsm" else method
  c = config_lib.k400_config(8, modules)
  if method == "ssa":
    config_lib.ssa_recipe(c, epochs=10)
    c.model.ssa.residual = True
    c.model.ssa.gate_init = 0.0
  else:
    config_lib.tsm_recipe(c, epochs=10)
  c.optim.base_lr = 0.001
  c.init_from = CONVERTED_RUNS[backbone]
  c.init_reinit = "/post/" if method == "gta" else "/inner/"
  return c
