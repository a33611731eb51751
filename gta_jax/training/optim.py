"""Optimizers and learning-rate schedules from `config.optim` (optax).

The peak learning rate is `optim.base_lr * batch_size / optim.lr_batch_size`
(linear scaling). Schedules, after `optim.warmup_steps` of linear warm-up from 0:

* `cosine`: cosine decay to 0 at `total_steps`;
* `step`: x`optim.step_factor` at each fraction of `total_steps` in
  `optim.step_boundaries`;
* `plateau`: constant; the train loop multiplies it by `optim.plateau_factor`
  after `optim.plateau_patience` validations without a better top-1 (the factor
  lives in `TrainState.lr_scale`, so it is checkpointed).

The optimizer is SGD with momentum (optionally Nesterov; PyTorch's form, weight
decay added to the gradient) or AdamW (decoupled weight decay). Weight decay only
applies to `kernel` parameters (convolutions and dense layers): BatchNorm scales
and biases, biases and the temporal modules' attention logits are not decayed.
Gradients are clipped by global norm first (`optim.grad_clip_norm`, 0 disables), the
classifier (`head/fc`) learns `optim.fc_lr_mult` times faster, GTA's global
attention logits `G` (and SSA's temporal bias, the same parameter name)
`optim.global_logits_lr_mult` times faster and the rest of the
ResNet (neither the classifier nor a temporal module) at `optim.backbone_lr_mult`
times the rate. Parameters whose path (`res2_block0/conv1/conv/kernel`) the regex
`optim.freeze` finds stay fixed: their gradients are zeroed before clipping and
their updates, weight decay included, after (their BatchNorm statistics still move
in training).
"""

from typing import Any

import re

import jax
import ml_collections
import optax
from absl import logging
from flax import traverse_util

from gta_jax.models import gta
from gta_jax.models import resnet

SCHEDULES = ("cosine", "step", "plateau")
OPTIMIZERS = ("sgd", "adamw")
CLASSIFIER = ("head", "fc")


def peak_learning_rate(config: ml_collections.ConfigDict) -> float:
  return config.optim.base_lr * config.batch_size / config.optim.lr_batch_size


def warmup_steps(config: ml_collections.ConfigDict) -> int:
  """`config.optim.warmup_steps`, clipped (with a warning) to runs shorter than it.

  A smoke run (`--config.total_steps=5` of a recipe with 20 warm-up steps) then warms
  up over all but its last step.

  Raises:
    ValueError: a negative count.
  """
  warmup, total = config.optim.warmup_steps, config.total_steps
  if warmup < 0:
    raise ValueError(f"config.optim.warmup_steps must be >= 0, got {warmup}")
  if warmup < total:
    return warmup
  logging.log_first_n(logging.WARNING, "config.optim.warmup_steps=%d is not shorter "
                      "than total_steps=%d: warming up for %d steps", 1, warmup, total,
                      total - 1)
  return total - 1


def learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
  """The schedule `config.optim.schedule` names, with warm-up (see module doc)."""
  o, total = config.optim, config.total_steps
  if o.schedule not in SCHEDULES:
    raise ValueError(f"config.optim.schedule must be one of {SCHEDULES}, got {o.schedule!r}")
  warmup = warmup_steps(config)
  peak = peak_learning_rate(config)
  if o.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, total, 0.0)
  if o.schedule == "step":
    fractions = tuple(o.step_boundaries)
    if any(not 0 < f < 1 for f in fractions) or list(fractions) != sorted(fractions):
      raise ValueError("config.optim.step_boundaries must be increasing fractions of "
                       f"total_steps in (0, 1), got {fractions}")
    steps = [int(f * total) for f in fractions]
    if steps[0] <= warmup or len(set(steps)) < len(steps):
      raise ValueError(f"config.optim.step_boundaries={fractions} of total_steps={total} "
                       f"give steps {steps}: they must be distinct and after the "
                       f"{warmup} warm-up steps")
    # The count restarts after the warm-up.
    main = optax.piecewise_constant_schedule(
        peak, {s - warmup: o.step_factor for s in steps})
  else:
    main = optax.constant_schedule(peak)
  if not warmup:
    return main
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), main], [warmup])


def weight_decay_mask(params: Any) -> Any:
  """True for the leaves that get weight decay: the `kernel`s."""
  flat = traverse_util.flatten_dict(params)
  return traverse_util.unflatten_dict({k: k[-1] == "kernel" for k in flat})


def learning_rate_multipliers(params: Any, fc_lr_mult: float,
                              global_logits_lr_mult: float = 1.0,
                              backbone_lr_mult: float = 1.0, freeze: str = "") -> Any:
  """Per-parameter multipliers of the update: `fc_lr_mult` for the classifier,
  `global_logits_lr_mult` for GTA's `G`s and SSA's temporal bias (parameters named
  `gta.GLOBAL_LOGITS`), 1 elsewhere in temporal modules, `backbone_lr_mult` for
  the rest, and 0 for what the regex `freeze` finds."""
  frozen = re.compile(freeze) if freeze else None

  def multiplier(path):
    if frozen is not None and frozen.search("/".join(path)):
      return 0.0
    if path[:2] == CLASSIFIER:
      return fc_lr_mult
    if path[-1] == gta.GLOBAL_LOGITS:
      return global_logits_lr_mult
    in_temporal_module = any(p in resnet.HOOK_POSITIONS for p in path)
    return 1.0 if in_temporal_module else backbone_lr_mult
  flat = traverse_util.flatten_dict(params)
  return traverse_util.unflatten_dict({k: multiplier(k) for k in flat})


def scale_by_tree(multipliers: Any) -> optax.GradientTransformation:
  """Multiplies each update by the matching leaf of `multipliers`."""
  return optax.stateless(
      lambda updates, params=None: jax.tree.map(lambda u, m: u * m, updates, multipliers))


def make_optimizer(config: ml_collections.ConfigDict, params: Any
                   ) -> optax.GradientTransformation:
  """The optax transformation `config.optim` describes, for these `params`.

  Args:
    config: the experiment config (`optim`, `batch_size`, `total_steps`).
    params: the model's parameters (or their shapes): they fix the weight-decay
      mask and the classifier's learning-rate multiplier.

  Raises:
    ValueError: naming the bad `config.optim` key.
  """
  o = config.optim
  if o.name not in OPTIMIZERS:
    raise ValueError(f"config.optim.name must be one of {OPTIMIZERS}, got {o.name!r}")
  if o.grad_clip_norm < 0 or o.weight_decay < 0:
    raise ValueError("config.optim.grad_clip_norm and weight_decay must be >= 0, got "
                     f"{o.grad_clip_norm}, {o.weight_decay}")
  for key in ("fc_lr_mult", "global_logits_lr_mult", "backbone_lr_mult"):
    if o[key] <= 0:
      raise ValueError(f"config.optim.{key} must be > 0, got {o[key]}")
  try:
    multipliers = learning_rate_multipliers(params, o.fc_lr_mult, o.global_logits_lr_mult,
                                            o.backbone_lr_mult, o.freeze)
  except re.error as e:
    raise ValueError(f"config.optim.freeze={o.freeze!r} is not a regex: {e}") from e
  schedule = learning_rate_schedule(config)
  mask = weight_decay_mask(params)
  parts = []
  if o.freeze:
    frozen = [k for k, m in traverse_util.flatten_dict(multipliers, sep="/").items() if not m]
    if not frozen:
      raise ValueError(f"config.optim.freeze={o.freeze!r} matches no parameter (paths "
                       "look like 'res2_block0/conv1/conv/kernel')")
    logging.info("config.optim.freeze=%r: %d parameter arrays frozen: %s", o.freeze,
                 len(frozen), ", ".join(frozen))
    parts.append(scale_by_tree(jax.tree.map(lambda m: float(m != 0), multipliers)))
  if o.grad_clip_norm:
    parts.append(optax.clip_by_global_norm(o.grad_clip_norm))
  if o.name == "sgd":
    parts += [optax.add_decayed_weights(o.weight_decay, mask),
              optax.trace(decay=o.momentum, nesterov=o.nesterov)]
  else:
    parts += [optax.scale_by_adam(), optax.add_decayed_weights(o.weight_decay, mask)]
  parts.append(optax.scale_by_learning_rate(schedule))
  # Decided by the config alone, never by which parameters a model has, so that the
  # optimizer state's structure (and so every checkpoint written before a new key
  # existed) follows from the config.
  if (o.fc_lr_mult != 1.0 or o.global_logits_lr_mult != 1.0 or o.backbone_lr_mult != 1.0
      or o.freeze):
    parts.append(scale_by_tree(multipliers))
  return optax.chain(*parts)
