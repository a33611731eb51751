"""The config schema shared by every recipe in `gta_jax/recipes/` (`configs/`).

`base_config()` holds every key any part of the project reads, with defaults, so
that `--config.a.b=value` overrides are type-checked by ml_collections and an unknown
key is an error. The recipe helpers below fill in the datasets' and papers' values;
each recipe file is a few lines on top of them.
"""

import importlib.util
import os

import ml_collections

from gta_jax.models import registry


def from_file(path: str) -> ml_collections.ConfigDict:
  """`get_config()` of a config file such as `gta_jax/recipes/synthetic_gta.py`."""
  name = os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(f"config_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def base_config() -> ml_collections.ConfigDict:
  """Every config key, with defaults (a TSN ResNet-50 on the embedded dataset)."""
  c = ml_collections.ConfigDict()
  c.task = "classification"  # or 'retrieval' (text-video; docs/retrieval.md)
  c.seed = 0
  c.total_steps = 1000
  c.batch_size = 64  # global, over all devices and processes
  c.log_every_steps = 10
  c.checkpoint_every_steps = 500
  c.eval_every_steps = 500
  c.keep_checkpoints = 2  # the last k; the best by val top-1 is kept besides
  # A NaN/inf loss, gradient norm or parameter (gta_jax/training/loop.py): 'stop'
  # the run, naming the newest finite checkpoint, or 'rollback' to that checkpoint,
  # skip the next nonfinite_skip_batches batches of the data stream and go on, at most
  # nonfinite_max_rollbacks times in one run.
  c.nonfinite = "stop"
  c.nonfinite_skip_batches = 100
  c.nonfinite_max_rollbacks = 3
  # The workdir's lease (gta_jax/training/lease.py): one training run per workdir; a
  # lease whose heartbeat is older than this is taken over.
  c.lease_timeout_s = 300.0
  # Fine-tuning (gta_jax/training/finetune.py): start from a run of this project (its
  # workdir, checkpoints/ folder or a step's folder); the classifier is re-initialised
  # when num_classes differs, and so is every variable whose path the regex
  # init_reinit finds (e.g. 'res5|head').
  c.init_from = ""
  c.init_reinit = ""

  c.data = ml_collections.ConfigDict()
  c.data.dataset = "synthetic_motion"
  c.data.data_dir = "./data"
  c.data.manual_dir = ""
  c.data.train_split = "train"
  c.data.eval_split = "val"
  c.data.num_frames = 8
  c.data.sampling = "segment"  # 'segment' (TSN) or 'dense' (3D clips)
  c.data.frame_interval = 1  # dense sampling only
  c.data.crop_size = 224
  c.data.scales = (1.0, 0.875, 0.75, 0.66)  # TSN multi-scale crop
  c.data.flip = True  # False for Something-Something (left/right labels)
  c.data.test_scale = 256
  c.data.resize_short = 256  # at preparation
  c.data.num_workers = -1  # decoding processes; -1: one per core this process may use
  c.data.read_threads = -1  # per process; -1: its share of those cores
  c.data.prefetch = 2
  # Training clips whose frames do not decode are counted, named in the log and
  # replaced by the next video of the stream; more than this many stop the run.
  c.data.max_bad_clips = 10
  # Training clips decoded by 'cpu' (libjpeg-turbo, in the loader's workers) or 'dali'
  # (NVIDIA DALI on the GPUs: pip install -e '.[dali]'); docs/data.md.
  c.data.decoder = "cpu"
  c.data.jpeg_quality = 90  # at preparation
  c.data.prepare_workers = 0  # decoding processes at preparation; 0 = one per CPU
  c.data.fold = 1  # ucf101 / hmdb51: official split 1, 2 or 3
  c.data.folder_name = ""  # video_folder: names the prepared copy ('' = manual_dir's basename)
  c.data.split_protocol = ""  # '' = the dataset's default; msrvtt: '1k-A' or 'official'
  c.data.synthetic = ml_collections.ConfigDict(dict(  # the embedded synthetic_motion
      train_per_class=120, val_per_class=25, num_frames=24, height=40, width=48, seed=0,
      train_captions=4))  # synthetic_captions: phrasings per training video

  c.eval = ml_collections.ConfigDict()
  c.eval.batch_size = 16
  c.eval.num_clips = 1
  c.eval.num_crops = 1  # 1 (centre) or 3 (along the long side)
  c.eval.split = "val"
  # The cheap protocol of validations during training (eval.py and the end of training
  # use the full one above); max_videos: an evenly spread subset of the split, 0 = all.
  c.eval.during_training = ml_collections.ConfigDict(dict(
      num_clips=1, num_crops=1, max_videos=2000))

  c.model = ml_collections.ConfigDict()
  c.model.num_classes = 10
  c.model.arch = "resnet2d"  # or 'resnet3d'
  c.model.depth = 50
  c.model.stage_sizes = ""  # e.g. '1,1,1,1' overrides the depth's
  c.model.width = 64
  c.model.small_stem = False
  c.model.dropout_rate = 0.5
  c.model.zero_init_residual = False
  c.model.dtype = "float32"  # compute dtype; parameters stay float32
  # Per-platform kernels (gta_jax/models/backend.py): softmax attention 'auto'
  # (custom on CPU, cuDNN/XLA on GPU, Pallas/XLA on TPU), 'custom', 'xla',
  # 'cudnn' or 'pallas'; cpu_kernels=False turns off the XLA:CPU-only kernels.
  c.model.attention_impl = "auto"
  c.model.cpu_kernels = True
  c.model.bn_group_size = 0  # BN statistics over groups of N clips; 0: global
  # BN's variance in training: E[x^2] - E[x]^2 (one pass, flax's fast variance) or
  # E[(x - E[x])^2] (two passes: accurate when the mean is large against the spread,
  # about 2% more of a TSM-R50 train step on a 2-core CPU); its running variance
  # updated with the biased batch variance (flax's) or the unbiased n/(n-1) one
  # (PyTorch's). docs/baselines.md.
  c.model.bn_two_pass_variance = False
  c.model.bn_running_var_unbiased = False
  c.model.temporal_modules = ""  # comma-separated; '' is TSN
  c.model.pretrained = ""  # path to ImageNet weights (.pth, .safetensors, .npz)
  c.model.pretrained_inflation = "mean"  # 2D->3D kernels: 'mean' (I3D) or 'center'
  # pool1_temporal_stride, pool2: mmaction2's I3D temporal max-pools (`pool1_stride_t`
  # on the stem's max-pool, `with_pool2` a (2, 1, 1) max-pool after res2).
  c.model.resnet3d = ml_collections.ConfigDict(dict(
      inflate="res4:all;res5:all", stem_temporal_kernel=1, stem_temporal_stride=1,
      pool1_temporal_stride=1, pool2=False))
  for name, spec in registry.TEMPORAL_MODULES.items():
    c.model[name] = spec.default_config()

  # Text-video retrieval (task='retrieval', gta_jax/retrieval/): the video network of
  # config.model without its classifier, a text encoder, both projected to one space.
  c.retrieval = ml_collections.ConfigDict()
  # 'finetune': the video network trains end to end; 'frozen': its pooled features,
  # computed once with the weights of init_from / model.pretrained, cached in the run.
  c.retrieval.video_encoder = "finetune"
  c.retrieval.embed_dim = 256
  c.retrieval.projection = "gated"  # HowTo100M's gated embedding unit, or 'linear'
  c.retrieval.loss = "max_margin"  # bidirectional ranking loss, or 'infonce'
  c.retrieval.margin = 0.1  # max_margin (HowTo100M's)
  c.retrieval.temperature_init = 0.07  # infonce's (learned)
  c.retrieval.eval_block_size = 1024  # queries scored at a time (metrics.ranks)
  c.text = ml_collections.ConfigDict()
  c.text.encoder = "max"  # 'max' (HowTo100M), 'transformer' or 'precomputed'
  c.text.vocab_size = 10000  # words (with <pad>, <unk>) kept from the training captions
  c.text.max_words = 20  # tokens per caption (HowTo100M: 20)
  c.text.drop_unknown = False  # HowTo100M drops unknown words; default: <unk>
  c.text.word_dim = 300  # word-embedding width (= the word-vector file's)
  c.text.word_vectors = ""  # word2vec .bin or GloVe/fastText text file, '' = learned
  c.text.word_vectors_format = "auto"  # 'auto' (.bin: binary), 'word2vec' or 'text'
  c.text.hidden_dim = 512
  c.text.layers = 2  # transformer
  c.text.heads = 4  # transformer
  c.text.precomputed = ""  # .npz of 'captions' and 'vectors' (encoder='precomputed')
  c.text.vector_dim = 512  # the width of those vectors

  c.optim = ml_collections.ConfigDict()
  c.optim.name = "sgd"  # 'sgd' or 'adamw'
  c.optim.momentum = 0.9
  c.optim.nesterov = False
  c.optim.base_lr = 0.01  # per `lr_batch_size` clips, scaled linearly
  c.optim.lr_batch_size = 64
  c.optim.schedule = "cosine"  # 'cosine', 'step' or 'plateau'
  c.optim.warmup_steps = 0
  c.optim.step_boundaries = (0.5, 0.75)  # fractions of total_steps, 'step' only
  c.optim.step_factor = 0.1
  c.optim.plateau_factor = 0.1
  c.optim.plateau_patience = 5  # evaluations without improvement
  c.optim.weight_decay = 5e-4
  c.optim.grad_clip_norm = 20.0  # 0 disables
  c.optim.fc_lr_mult = 5.0
  c.optim.global_logits_lr_mult = 1.0  # GTA's global attention logits G
  # The ResNet's own parameters (not the classifier, not the temporal modules).
  c.optim.backbone_lr_mult = 1.0
  c.optim.freeze = ""  # regex (re.search) of parameter paths that stay fixed, e.g. '^res[23]'
  c.optim.label_smoothing = 0.0
  return c


# Training-set sizes, for converting the papers' epochs into steps.
TRAIN_VIDEOS = {"something_something_v2": 168_913, "kinetics400": 240_436}


def epochs_to_steps(epochs: float, dataset: str, batch_size: int) -> int:
  return int(round(epochs * TRAIN_VIDEOS[dataset] / batch_size))


def synthetic_config(temporal_modules: str = "") -> ml_collections.ConfigDict:
  """A tiny 2D ResNet on the embedded `synthetic_motion` data: minutes on a CPU.

  The backbone is a bottleneck ResNet with one block per stage, 8 channels wide,
  with a 3x3 stem for 32px frames (res2 at 32x32 ... res5 at 4x4). TSM shifts in
  every block; Non-local goes after res3 and res4 block 0, GTA after res4 block 0,
  SSA inside res4 and res5 block 0, where its spatial attention is cheap (SSA
  inside res3's first block would attend over 32x32 positions: 3x the step time).
  GTA's and SSA's output BN scale starts at 1 (trained from scratch, no identity is
  needed at init);
  GTA's heads are grouped, not cross-channel, and SSA has 8 temporal heads; the
  other switches keep their defaults (docs/ablations.md).
  """
  c = base_config()
  # Measured (README, "Results"): a TSM reaches 0.9 val top-1 in about 500 steps.
  c.total_steps = 600
  c.batch_size = 16
  c.log_every_steps = 10
  c.checkpoint_every_steps = 200
  c.eval_every_steps = 200
  c.data.dataset = "synthetic_motion"
  c.data.num_frames = 8
  c.data.crop_size = 32
  c.data.test_scale = 32
  c.data.resize_short = 32
  c.data.scales = (1.0, 0.875)
  c.data.flip = False  # left and right are classes
  c.eval.batch_size = 32
  c.model.num_classes = 10
  c.model.depth = 50
  c.model.stage_sizes = "1,1,1,1"
  c.model.width = 8
  c.model.small_stem = True
  c.model.dropout_rate = 0.0
  c.model.temporal_modules = temporal_modules
  c.model.nl.placement = "res3:0;res4:0"
  # Keys and values at full resolution, as GTA's spatial step here (gta.pool_keys
  # False): the released 2x2 sub-sampling leaves 4x4 keys of res4's 8x8 map, and
  # on this task pooled keys cost GTA 0.956 -> 0.924 (docs/ablations.md, rows
  # `r34_gta` and `r34_gta_pool_keys`, seed 0).
  c.model.nl.sub_sample = False
  c.model.ssa.placement = "res4:0;res5:0"
  c.model.ssa.scale = "sqrt_d"  # unscaled, the temporal softmax starts one-hot
  c.model.ssa.residual = True  # x + BN(y)
  c.model.ssa.gate_init = 1.0  # trained from scratch: no identity needed at init
  # 8 temporal heads, each mixing its own channels, instead of the paper's one
  # (docs/ablations.md, rows `dot_ssa` and `dot_ssa_one_head`).
  c.model.ssa.temporal_heads = 8
  # y = (M_T - I) v, and M_T's logits the cosine of q^ and k^ times a learned
  # per-head scale from 10 (neither in the paper): 0.984 / 0.984 / 0.996 val top-1
  # (seeds 0-2) against 0.904 / 0.900 with the paper's dot products and M_T v,
  # whose logits grew to 1e5-1e10 in training: one-hot rows of M_T that pass no
  # gradient to q^ and k^ (docs/ssa.md, "The saturated M_T"; docs/ablations.md,
  # rows `ssa`, `ssa_softmax`, `ssa_dot` and `dot_ssa`).
  c.model.ssa.temporal_norm = "softmax-identity"
  c.model.ssa.temporal_cosine_scale = 10.0
  # After res4 alone (8 x 8 positions): 0.944 val top-1 in 234 s of training
  # against 0.956 in 340 s after res3 and res4, and 0.988 in 291 s after res4 and
  # res5 (seed 0; docs/ablations.md, rows `gta`, `r34_gta`, `gta_res4_res5`): the
  # cheapest placement that learns frame order.
  c.model.gta.placement = "res4:0"
  c.model.gta.gate_init = 1.0
  # Grouped heads (each head projects its own slice of channels) instead of the
  # paper's cross-channel heads: 0.944/0.972 against 0.892/0.952 val top-1 (seeds
  # 0, 1; docs/ablations.md, rows `gta` and `gta_cross_channel`; after res3 and res4
  # 0.956/0.964 against 0.880/0.868).
  c.model.gta.cross_channel = False
  # G starts far from uniform and learns 20x faster: with std 0.02 and AdamW's
  # ~lr-sized steps, G stayed a uniform temporal average for hundreds of steps.
  c.model.gta.global_init_std = 1.0
  c.optim.global_logits_lr_mult = 20.0
  # AdamW: on this data SGD at lr 0.1 per 16 clips diverged in warm-up (train loss
  # 2.38 -> 3.33 by step 30).
  c.optim.name = "adamw"
  c.optim.base_lr = 0.002
  c.optim.lr_batch_size = 16
  c.optim.weight_decay = 0.01
  c.optim.warmup_steps = 20
  c.optim.fc_lr_mult = 1.0
  return c


def synthetic_long_config(temporal_modules: str = "") -> ml_collections.ConfigDict:
  """`synthetic_config` on the second embedded task, `synthetic_long`.

  Long-range order and relations between objects (docs/ablations.md has the design):
  20-frame clips, every frame sampled, 8 classes; `synthetic_config`'s 16 clips a step
  and optimiser, 600 steps, and a network twice as wide (16 channels in the first
  stage). At 8 clips a step (half the cost) GTA learned the long-range pairs and
  nothing of the relation pairs: 0.620 val top-1 against 0.870 at 16 (seed 0;
  docs/ablations.md, "Revision 1.3.0"). At width 8 whether the relation pairs were
  learned depended on the seed (GTA 0.870 / 0.670 with seeds 0 / 1; four other
  changes left seed 1 on its plateau); at width 16 seed 1 reached 0.935, at about
  twice the step time (docs/ablations.md, "the seed-1 plateau is width").
  """
  c = synthetic_config(temporal_modules)
  c.model.width = 16
  c.data.dataset = "synthetic_long"
  c.data.synthetic.num_frames = 20
  c.data.num_frames = 20
  c.model.num_classes = 8
  c.eval.batch_size = 20
  return c


def tsm_recipe(c: ml_collections.ConfigDict, epochs: float) -> None:
  """TSM's recipe (Lin et al.): SGD 0.9, lr 0.01 per 64 clips, cosine, dropout 0.5,
  grad-norm clip 20, fc lr x5. Weight decay is set by the dataset helpers."""
  c.batch_size = 64
  c.optim.name = "sgd"
  c.optim.momentum = 0.9
  c.optim.base_lr = 0.01
  c.optim.lr_batch_size = 64
  c.optim.schedule = "cosine"
  c.optim.grad_clip_norm = 20.0
  c.optim.fc_lr_mult = 5.0
  c.model.dropout_rate = 0.5
  c.total_steps = epochs_to_steps(epochs, c.data.dataset, c.batch_size)
  c.optim.warmup_steps = epochs_to_steps(1, c.data.dataset, c.batch_size)
  c.checkpoint_every_steps = 2000
  c.eval_every_steps = 5000
  c.log_every_steps = 50


def ssa_recipe(c: ml_collections.ConfigDict, epochs: float) -> None:
  """SSAN's recipe (Guo et al.): SGD Nesterov 0.9, lr 0.01 per 64 clips, wd 5e-4,
  dropout 0.5, x0.1 on plateau after a 1-epoch linear warm-up; 1 clip x centre crop
  at test. The paper gives no clipping or fc lr multiplier: TSM's are kept."""
  tsm_recipe(c, epochs)
  c.optim.nesterov = True
  c.optim.schedule = "plateau"
  c.optim.plateau_factor = 0.1
  c.optim.weight_decay = 5e-4
  c.eval.num_clips = 1
  c.eval.num_crops = 1


def ssv2_config(num_frames: int, temporal_modules: str = "",
                epochs: float = 50) -> ml_collections.ConfigDict:
  """A 2D ResNet-50 on Something-Something v2 (174 classes, no flips), TSM recipe."""
  c = base_config()
  c.data.dataset = "something_something_v2"
  c.data.eval_split = c.eval.split = "validation"
  c.data.num_frames = num_frames
  c.data.flip = False
  c.model.num_classes = 174
  c.model.temporal_modules = temporal_modules
  tsm_recipe(c, epochs)
  c.optim.weight_decay = 5e-4
  return c


def k400_config(num_frames: int, temporal_modules: str = "",
                epochs: float = 100) -> ml_collections.ConfigDict:
  """A 2D ResNet-50 on Kinetics-400 (400 classes), TSM recipe with wd 1e-4."""
  c = base_config()
  c.data.dataset = "kinetics400"
  c.data.eval_split = c.eval.split = "validation"
  c.data.num_frames = num_frames
  c.model.num_classes = 400
  c.model.temporal_modules = temporal_modules
  tsm_recipe(c, epochs)
  c.optim.weight_decay = 1e-4
  return c


def k400_3d_config(clip_len: int = 8, frame_interval: int = 8,
                   temporal_modules: str = "") -> ml_collections.ConfigDict:
  """A 3D ResNet-50 (SlowOnly pattern: kt=3 in res4/res5) on Kinetics-400, dense
  clips, with the Non-local paper's I3D schedule: lr 0.01 per 64 clips, x0.1 at
  150k and 300k of 400k steps, wd 1e-4, dropout 0.5; 10 clips x 3 crops at test."""
  c = k400_config(clip_len, temporal_modules)
  c.model.arch = "resnet3d"
  c.data.sampling = "dense"
  c.data.frame_interval = frame_interval
  c.total_steps = 400_000
  c.optim.schedule = "step"
  c.optim.step_boundaries = (150_000 / 400_000, 300_000 / 400_000)
  c.optim.warmup_steps = 0
  c.optim.fc_lr_mult = 1.0
  c.optim.grad_clip_norm = 0.0
  c.eval.num_clips = 10
  c.eval.num_crops = 3
  return c


def retrieval_synthetic_config(temporal_modules: str = "") -> ml_collections.ConfigDict:
  """Text-video retrieval on the embedded `synthetic_captions` (minutes on a CPU).

  The video side is `synthetic_config`'s tiny ResNet with the same temporal modules
  and their settings; the text side HowTo100M's max-pooled word encoder over
  learned word embeddings; both project to 128-d gated embeddings, trained with
  the symmetric InfoNCE loss (val text-to-video R@1 / R@5 of GTA, seed 0, 600 steps
  of 32 clips: 0.204 / 0.600 against 0.112 / 0.420 with HowTo100M's max-margin loss,
  margin 0.1; docs/retrieval.md), 600 steps of 24 clips. Validation queries are
  the val split's captions, one per video, against its 250 videos: each draw with
  its time-reversed twin (docs/retrieval.md).
  """
  c = synthetic_config(temporal_modules)
  c.task = "retrieval"
  c.retrieval.loss = "infonce"
  c.data.dataset = "synthetic_captions"
  # 24 clips a step: at 32, SSA's train + eval took 411 s (seed 0), over the 6 minutes
  # a recipe may take on the 2-core CPU.
  c.batch_size = 24
  c.optim.lr_batch_size = 24
  c.eval_every_steps = 300
  c.retrieval.embed_dim = 128
  c.text.vocab_size = 256
  c.text.word_dim = 64
  c.text.hidden_dim = 128
  c.text.max_words = 16
  c.eval.batch_size = 50
  return c


def retrieval_config(dataset: str, split_protocol: str = "") -> ml_collections.ConfigDict:
  """Text-video retrieval on MSR-VTT or YouCook2 with an SSA-R50 video side, in the
  HowTo100M framework (Miech et al. 2019), which SSAN's retrieval results build on.

  The video side is frozen: the SSA-R50 of `configs/k400_ssa_r50_8f.py` (8 segments,
  224px centre crop), with the weights of a Kinetics-400 run named by
  `--config.init_from=WORKDIR`, its pooled features cached once per split. The text
  side is HowTo100M's: word vectors from `--config.text.word_vectors` (GoogleNews
  word2vec, 300-d; learned from scratch if not given), linear + ReLU, max over at
  most 20 words, then a gated embedding unit; the bidirectional max-margin ranking
  loss with margin 0.1; Adam at 1e-4. The batch and the number of steps are our
  choices (HowTo100M's code trains its MSR-VTT model for a fixed number of epochs
  that we could not confirm): 256 pairs, 50 epochs of the training split.
  """
  c = k400_config(8, "ssa")
  ssa_recipe(c, epochs=1)
  c.task = "retrieval"
  c.data.dataset = dataset
  c.data.split_protocol = split_protocol
  c.data.flip = False  # captions say left and right
  c.data.eval_split = c.eval.split = "test" if dataset == "msrvtt" else "val"
  c.retrieval.video_encoder = "frozen"
  c.retrieval.loss = "max_margin"
  c.retrieval.margin = 0.1
  c.retrieval.embed_dim = 512
  c.retrieval.eval_block_size = 1024
  c.text.encoder = "max"
  c.text.word_dim = 300
  c.text.hidden_dim = 2048
  c.text.max_words = 20
  c.text.drop_unknown = True  # HowTo100M leaves out words without a vector
  c.batch_size = 256
  c.optim.name = "adamw"
  c.optim.base_lr = 1e-4
  c.optim.lr_batch_size = 256
  c.optim.weight_decay = 0.0
  c.optim.schedule = "cosine"
  c.optim.warmup_steps = 0
  c.optim.fc_lr_mult = 1.0
  c.optim.grad_clip_norm = 0.0
  train_videos = {"msrvtt": 9000, "youcook2": 10337}[dataset]  # 1k-A train; YC2 clips
  c.total_steps = int(round(50 * train_videos / c.batch_size))
  c.checkpoint_every_steps = 500
  c.eval_every_steps = 500
  c.log_every_steps = 20
  c.eval.batch_size = 64
  c.eval.during_training.max_videos = 0
  return c
