"""Jitted train and eval steps.

Both take batches straight from the data loaders: `uint8` video is normalised by
the ImageNet mean/std inside the step (so uint8 travels to the device); a float
video is taken as already normalised.

* :func:`make_train_step` -> `step(state, batch) -> (state, metrics)`, state donated.
  `batch = {'video': (B, T, H, W, 3), 'label': (B,)}`.
* :func:`make_eval_step` -> `step(variables, batch) -> outputs`: multi-view testing,
  `batch['video']` is `(B, V, T, H, W, 3)`, the softmax is averaged over the V views.

Given a `mesh`, the state is replicated and the batch split along `data`; without
one, plain `jax.jit` runs on the default device (handy for benchmarks and tests).
"""

from typing import Any, Callable, Dict, Optional

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from gta_jax.data import transforms
from gta_jax.models import resnet
from gta_jax.training import sharding
from gta_jax.training.state import TrainState


def prepare_video(video: jax.Array) -> jax.Array:
  """uint8 frames -> normalised float32; float input passes through."""
  return transforms.normalize(video) if video.dtype == jnp.uint8 else video


def cross_entropy(logits: jax.Array, labels: jax.Array,
                  label_smoothing: float = 0.0) -> jax.Array:
  """Per-example softmax cross-entropy with optional label smoothing."""
  targets = jax.nn.one_hot(labels, logits.shape[-1])
  if label_smoothing:
    targets = optax.smooth_labels(targets, label_smoothing)
  return optax.softmax_cross_entropy(logits, targets)


def make_train_step(model, tx: optax.GradientTransformation, *,
                    learning_rate_fn: Optional[Callable[[Any], Any]] = None,
                    label_smoothing: float = 0.0, dropout_seed: int = 0,
                    mesh: Optional[Mesh] = None) -> Callable:
  """A jitted SGD step for `model` with optimizer `tx`.

  Args:
    model: a flax module, `apply(variables, video, train=True)` -> logits.
    tx: the optimizer (e.g. from `optim.make_optimizer`).
    learning_rate_fn: step -> learning rate, only for the `lr` metric.
    label_smoothing: in [0, 1).
    dropout_seed: the dropout key of step s is `fold_in(key(dropout_seed), s)`,
      so a resumed run draws the same masks.
    mesh: if given, the state is replicated and the batch split over `data`.

  Returns:
    `step(state, batch) -> (state, metrics)`; the input state is donated.
    `metrics` holds scalar `loss`, `accuracy`, `grad_norm` and `lr`.
  """

  def loss_fn(params, batch_stats, batch, rng):
    labels = batch["label"]
    logits, updates = model.apply(
        {"params": params, "batch_stats": batch_stats}, prepare_video(batch["video"]),
        train=True, mutable=["batch_stats"], rngs={"dropout": rng})
    loss = jnp.mean(cross_entropy(logits, labels, label_smoothing))
    accuracy = jnp.mean(jnp.argmax(logits, -1) == labels)
    return loss, ({"accuracy": accuracy}, updates)

  return make_update_step(loss_fn, tx, learning_rate_fn=learning_rate_fn,
                          dropout_seed=dropout_seed, mesh=mesh)


def make_update_step(loss_fn: Callable, tx: optax.GradientTransformation, *,
                     learning_rate_fn: Optional[Callable[[Any], Any]] = None,
                     dropout_seed: int = 0, mesh: Optional[Mesh] = None) -> Callable:
  """The jitted step of any task: a gradient of `loss_fn`, an optimizer update.

  Args:
    loss_fn: `(params, batch_stats, batch, dropout_rng) -> (loss, (metrics,
      updates))`, where `updates` holds the new `batch_stats` and `metrics` the
      task's scalars (at least `accuracy`).
    tx, learning_rate_fn, dropout_seed, mesh: as in :func:`make_train_step`.

  Returns:
    `step(state, batch) -> (state, metrics)`, the state donated; `metrics` adds
    `loss`, `grad_norm` and `lr` to the task's.
  """
  base_key = jax.random.key(dropout_seed)

  def train_step(state: TrainState, batch: Dict[str, jax.Array]):
    rng = jax.random.fold_in(base_key, state.step)
    (loss, (metrics, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, state.batch_stats, batch, rng)
    deltas, opt_state = tx.update(grads, state.opt_state, state.params)
    deltas = jax.tree.map(lambda d: d * state.lr_scale, deltas)
    lr = learning_rate_fn(state.step) if learning_rate_fn else jnp.nan
    metrics = dict(metrics, loss=loss, grad_norm=optax.tree.norm(grads),
                   lr=lr * state.lr_scale)
    new_state = state.replace(
        step=state.step + 1,
        params=optax.apply_updates(state.params, deltas),
        batch_stats=updates.get("batch_stats", state.batch_stats),
        opt_state=opt_state)
    return new_state, metrics

  if mesh is None:
    return jax.jit(train_step, donate_argnums=0)
  rep, data = sharding.replicated(mesh), sharding.batch_sharded(mesh)
  return jax.jit(train_step, in_shardings=(rep, data), out_shardings=(rep, rep),
                 donate_argnums=0)


def make_eval_step(model, mesh: Optional[Mesh] = None,
                   feature_layer: Optional[str] = None) -> Callable:
  """A jitted multi-view prediction step.

  Args:
    model: the flax module.
    mesh: if given, variables are replicated, the batch split over `data` and the
      outputs gathered (replicated), so every process sees every video.
    feature_layer: if given (`resnet.FEATURE_LAYERS`: `pre_logits`, `res2` ...
      `res5`), the outputs also hold `features (B, C)`, that layer's pooled vector
      averaged over the V views.

  Returns:
    `step(variables, batch) -> dict(probs=(B, K), label, mask, video_index)`, where
    `probs` is the softmax averaged over the V views of each video; the other
    entries are passed through.
  """

  if feature_layer is not None:
    resnet.check_feature_layer(feature_layer)

  def eval_step(variables, batch):
    video = batch["video"]
    b, v = video.shape[:2]
    clips = prepare_video(video.reshape((b * v,) + video.shape[2:]))
    out = {k: batch[k] for k in ("label", "mask", "video_index") if k in batch}
    if feature_layer is None:
      logits = model.apply(variables, clips, train=False)
    else:
      logits, sown = model.apply(variables, clips, train=False, mutable=[resnet.FEATURES])
      features = resnet.pooled_feature(sown[resnet.FEATURES], feature_layer)
      out["features"] = features.reshape(b, v, -1).mean(axis=1)
    out["probs"] = jax.nn.softmax(logits.astype(jnp.float32)).reshape(b, v, -1).mean(axis=1)
    return out

  if mesh is None:
    return jax.jit(eval_step)
  rep, data = sharding.replicated(mesh), sharding.batch_sharded(mesh)
  return jax.jit(eval_step, in_shardings=(rep, data), out_shardings=rep)
