"""The train state: parameters, BatchNorm statistics, optimizer state, step.

`lr_scale`, `plateau_best` and `plateau_count` belong to the reduce-on-plateau
schedule (see `gta_jax.training.optim`); they stay 1, -1 and 0 otherwise.
"""

from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax

from gta_jax import pretrained
from gta_jax.models import registry
from gta_jax.training import finetune
from gta_jax.training import optim
from gta_jax.training import sharding


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: optax.OptState
  lr_scale: jax.Array
  plateau_best: jax.Array
  plateau_count: jax.Array

  @property
  def variables(self):
    """What `model.apply` takes."""
    return {"params": self.params, "batch_stats": self.batch_stats}


def input_shape(config: ml_collections.ConfigDict, batch: int = 1):
  """The shape of a training clip batch `(B, T, H, W, 3)`."""
  d = config.data
  return (batch, d.num_frames, d.crop_size, d.crop_size, 3)


def is_retrieval(config: ml_collections.ConfigDict) -> bool:
  """Whether the config's task is text-video retrieval (`config.task`)."""
  return config.get("task", "classification") == "retrieval"


def init_variables(model, config: ml_collections.ConfigDict, rng: jax.Array):
  """The model's initial `params` and `batch_stats` (pure: jit or eval_shape it)."""
  inputs = (jnp.zeros(input_shape(config), jnp.float32),)
  if is_retrieval(config):
    from gta_jax.retrieval import model as retrieval_model  # pylint: disable=g-import-not-at-top
    inputs = (retrieval_model.example_video(config), retrieval_model.example_text(config))
  variables = model.init({"params": rng, "dropout": rng}, *inputs, train=False)
  return {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}


def loads_weights(config: ml_collections.ConfigDict) -> bool:
  """Whether :func:`load_pretrained` changes a fresh initialisation."""
  return bool(config.model.pretrained or config.init_from
              or (is_retrieval(config) and config.text.word_vectors))


def load_pretrained(variables: Any, config: ml_collections.ConfigDict) -> Any:
  """Applies `config.model.pretrained` (ImageNet weights) or `config.init_from` (a run
  of this project, `training.finetune`), if set, to host variables; a retrieval
  model's video network takes them (`retrieval.model.load_weights`), and its word
  embeddings `config.text.word_vectors`.

  Raises:
    ValueError: both are set.
  """
  if is_retrieval(config):
    from gta_jax.retrieval import model as retrieval_model  # pylint: disable=g-import-not-at-top
    return retrieval_model.load_weights(variables, config)
  if config.model.pretrained and config.init_from:
    raise ValueError("set config.model.pretrained (ImageNet weights) or config.init_from "
                     f"(a run of this project), not both: got {config.model.pretrained!r} "
                     f"and {config.init_from!r}")
  if config.init_from:
    return finetune.load_init_from(variables, config)
  if not config.model.pretrained:
    return variables
  return pretrained.load_pretrained(variables, config.model.pretrained, config)


def create_train_state(variables: Any, tx: optax.GradientTransformation) -> TrainState:
  """A state at step 0 (pure: jit or eval_shape it)."""
  return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=variables["params"],
      batch_stats=variables["batch_stats"],
      opt_state=tx.init(variables["params"]),
      lr_scale=jnp.ones((), jnp.float32),
      plateau_best=-jnp.ones((), jnp.float32),
      plateau_count=jnp.zeros((), jnp.int32))


def update_plateau(state: TrainState, top1: float, config: ml_collections.ConfigDict):
  """The plateau fields after a validation with this top-1, as host numbers.

  Returns:
    `(lr_scale, best, count)`: the scale drops by `optim.plateau_factor` when
    `optim.plateau_patience` validations in a row did not beat the best top-1.
  """
  scale, best, count = (float(state.lr_scale), float(state.plateau_best),
                        int(state.plateau_count))
  if top1 > best:
    return scale, top1, 0
  count += 1
  if count >= config.optim.plateau_patience:
    return scale * config.optim.plateau_factor, best, 0
  return scale, best, count


def build(config: ml_collections.ConfigDict, mesh=None):
  """The model, optimizer, schedule and the abstract train state of a config.

  Args:
    config: the experiment config.
    mesh: if given, the abstract state carries the replicated sharding (the target
      of a checkpoint restore).

  Returns:
    `(model, tx, learning_rate_fn, abstract_state)`; `abstract_state` holds
    `jax.ShapeDtypeStruct`s.
  """
  model = registry.build_model(config)
  variables = jax.eval_shape(lambda: init_variables(model, config, jax.random.key(0)))
  tx = optim.make_optimizer(config, variables["params"])
  abstract = jax.eval_shape(lambda: create_train_state(variables, tx))
  if mesh is not None:
    rep = sharding.replicated(mesh)
    abstract = jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=rep), abstract)
  return model, tx, optim.learning_rate_schedule(config), abstract


# Initialisation runs once, and XLA:CPU spends most of its compile time optimising the
# random initialisers (a minute for the tiny synthetic nets): compile it without.
_CPU_INIT_COMPILER_OPTIONS = {"xla_backend_optimization_level": 0,
                              "xla_llvm_disable_expensive_passes": True}


def _run_once(fn, *args, out_shardings=None):
  """`jax.jit(fn)(*args)`, compiled without optimisation on CPU."""
  lowered = jax.jit(fn, out_shardings=out_shardings).lower(*args)
  options = _CPU_INIT_COMPILER_OPTIONS if jax.default_backend() == "cpu" else None
  return lowered.compile(compiler_options=options)(*args)


def initial_state(config: ml_collections.ConfigDict, model, tx, mesh) -> TrainState:
  """A fresh replicated state: random init from `config.seed`, then pretrained weights
  or those of `config.init_from` (:func:`load_pretrained`)."""
  rep = sharding.replicated(mesh)
  rng = jax.random.key(config.seed)
  if not loads_weights(config):
    return _run_once(lambda r: create_train_state(init_variables(model, config, r), tx),
                     rng, out_shardings=rep)
  variables = _run_once(lambda r: init_variables(model, config, r), rng)
  variables = sharding.replicate(load_pretrained(jax.device_get(variables), config), mesh)
  return _run_once(lambda v: create_train_state(v, tx), variables, out_shardings=rep)
