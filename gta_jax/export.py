r"""Exports a checkpoint's model for serving without this package: `jax.export` or ONNX.

  python -m gta_jax.export --config configs/X.py --workdir DIR --out model.jaxexport \
      [--platforms cpu,cuda,tpu] [--checkpoint_step latest|best|N] [--config.a.b=value ...]
  python -m gta_jax.export --format=onnx --config configs/X.py --workdir DIR \
      --out model.onnx [--onnx_opset 18] [--checkpoint_step ...] [--config.a.b=value ...]

Either file holds the inference function with the parameters inside: a normalised clip
`(B, T, S, S, 3)` float32 (ImageNet mean/std, channels last, `T = data.num_frames`,
`S = data.crop_size`; B is symbolic) in, logits `(B, num_classes)` float32 out.

`--format=jax` (the default) traces the model with the platform-neutral kernels
(`attention_impl='xla'`, no XLA:CPU-only kernels), so one trace serves every platform,
and lowers it for every platform of `--platforms` where the model lowers (a platform
that fails is named and left out; `cpu` must work). Reading it needs only `jax` (and
`flatbuffers`):

  from jax import export
  exported = export.deserialize(open("model.jaxexport", "rb").read())
  logits = exported.call(clips)          # clips: float32 (B, T, S, S, 3)

`--format=onnx` converts the function with jax2onnx (input `clips`, output `logits`,
batch dimension `B`; traced with the kernels of :func:`onnx_traceable`), then runs the
file with onnxruntime on random clips and prints its largest difference from
`model.apply` (above :data:`ONNX_RTOL` of the largest |logit| plus :data:`ONNX_ATOL`,
it raises :class:`OnnxMismatchError` and writes nothing). It needs the `onnx` extra and
jax2onnx installed without its requirements (:data:`ONNX_INSTALL`): jax2onnx 0.17.1
declares `orbax-checkpoint<0.11.37`, which this project's orbax-checkpoint>=0.12.8
rules out, but it never imports orbax. docs/features.md ("ONNX") has a recipe that
keeps that install in a second environment.

Multi-view testing is the caller's: average the softmax over the views of a video.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from typing import Optional, Sequence, Union

from gta_jax import cli
from gta_jax import paths

PLATFORMS = ("cpu", "cuda", "tpu")
FORMATS = ("jax", "onnx")
JAX2ONNX = "jax2onnx==0.17.1"  # the version tested (tests/test_onnx.py)
ONNX_INSTALL = f"pip install 'gta_jax[onnx]' && pip install --no-deps {JAX2ONNX}"
# jax2onnx writes ReduceMean with its axes as an input, which opset 18 introduced.
MIN_ONNX_OPSET = 18
# The largest difference from model.apply's logits an ONNX file may have, relative to
# the largest |logit|, plus an absolute floor.
ONNX_RTOL, ONNX_ATOL = 1e-3, 1e-5


def portable(config):
  """`config` with the kernels every platform has (see the module docstring)."""
  config = config.copy_and_resolve_references()
  config.model.attention_impl = "xla"
  config.model.cpu_kernels = False
  return config


def onnx_traceable(config):
  """`config` with the kernels the ONNX export traces with, on any platform.

  jax2onnx 0.17.1 turns `lax.reduce_window_max` into an ONNX MaxPool whose window
  spans all four dimensions of the channels-last input, which onnxruntime rejects,
  and its stand-in for `flax.linen.max_pool` takes no explicit padding (the stem's
  max-pool pads 1 on each side, as torchvision's). The XLA:CPU kernels
  (`gta_jax.models.cpu_kernels`) compute that max-pool as the maximum of 9 strided
  slices of the -inf padded input instead: the same values, in ops jax2onnx converts.
  (Their 1x1 convolutions as matmuls do not reach the file: jax2onnx converts
  `flax.linen.Conv` to an ONNX Conv whatever it is given to run.) Attention is `xla`
  (plain softmax attention).
  """
  config = config.copy_and_resolve_references()
  config.model.attention_impl = "xla"
  config.model.cpu_kernels = True
  return config


def inference_function(config, variables, platform: Optional[str] = None):
  """The model's `clips -> logits` with `variables` as constants.

  Args:
    config: the config to build the model from, as it is (e.g. :func:`portable`).
    variables: `{'params': ..., 'batch_stats': ...}`.
    platform: trace with the kernels of this platform (`gta_jax.models.backend`)
      rather than the default backend's.

  Returns:
    `(function, clip_shape)`: the function (not jitted) and the shape of one clip,
    `(T, S, S, 3)`.
  """
  import jax  # pylint: disable=g-import-not-at-top
  from gta_jax.models import backend  # pylint: disable=g-import-not-at-top
  from gta_jax.models import registry  # pylint: disable=g-import-not-at-top
  from gta_jax.training import state as state_lib  # pylint: disable=g-import-not-at-top
  model = registry.build_model(config)
  variables = jax.device_get(variables)
  _, *clip = state_lib.input_shape(config)

  def infer(clips):
    with backend.force_platform(platform) if platform else contextlib.nullcontext():
      return model.apply(variables, clips, train=False)
  return infer, tuple(clip)


def export_model(config, variables, platforms: Sequence[str] = PLATFORMS):
  """`jax.export` of `clips -> logits` with `variables` as constants.

  Args:
    config: the config the variables were trained with.
    variables: `{'params': ..., 'batch_stats': ...}`.
    platforms: those to lower for; the ones that fail are left out.

  Returns:
    `(exported, failures)`: the `jax.export.Exported` for the platforms that lowered,
    and `{platform: error message}` for the others.

  Raises:
    ValueError: an unknown platform, or `cpu` asked for and failing.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from jax import export  # pylint: disable=g-import-not-at-top
  unknown = sorted(set(platforms) - set(PLATFORMS))
  if unknown or not platforms:
    raise ValueError(f"platforms must be some of {PLATFORMS}, got {list(platforms)}")
  infer, clip = inference_function(portable(config), variables)
  infer = jax.jit(infer)
  spec = jax.ShapeDtypeStruct(export.symbolic_shape("b") + clip, jnp.float32)
  lower = lambda platforms: export.export(infer, platforms=tuple(platforms))(spec)
  try:
    return lower(platforms), {}
  except Exception:  # pylint: disable=broad-except
    pass  # find which platforms fail
  failures = {}
  for platform in platforms:
    try:
      lower([platform])
    except Exception as e:  # pylint: disable=broad-except
      failures[platform] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
  if "cpu" in failures:
    raise ValueError(f"the model does not lower for cpu: {failures['cpu']}")
  working = [p for p in platforms if p not in failures]
  if not working:
    raise ValueError(f"the model lowers for none of {list(platforms)}: {failures}")
  return lower(working), failures


def _import_onnx_tools():
  """jax2onnx and onnxruntime, or an ImportError that says how to install them."""
  try:
    import jax2onnx  # pylint: disable=g-import-not-at-top
    import onnxruntime  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(f"--format=onnx needs the module {e.name!r}: {ONNX_INSTALL} "
                      "(docs/features.md, ONNX)") from e
  return jax2onnx, onnxruntime


def _check_opset(opset: int) -> None:
  if opset < MIN_ONNX_OPSET:
    raise ValueError(f"onnx_opset must be at least {MIN_ONNX_OPSET}, got {opset}")


class _ConverterRootLogs(logging.Filter):
  """Drops what jax2onnx logs through the root logger below ERROR."""

  def filter(self, record: logging.LogRecord) -> bool:
    return record.levelno >= logging.ERROR or "jax2onnx" not in record.pathname


@contextlib.contextmanager
def _quiet_converter_logs():
  """Keeps jax2onnx's and onnx_ir's chatter out of the CLI's output: its parameters,
  plugins for libraries not installed (equinox, dm_pix) and value types left
  unserialised."""
  loggers = [logging.getLogger(name) for name in ("jax2onnx", "onnx_ir")]
  levels = [logger.level for logger in loggers]
  for logger in loggers:
    logger.setLevel(logging.ERROR)
  root_filter = _ConverterRootLogs()
  logging.getLogger().addFilter(root_filter)
  try:
    yield
  finally:
    logging.getLogger().removeFilter(root_filter)
    for logger, level in zip(loggers, levels):
      logger.setLevel(level)


def export_onnx(config, variables, opset: int = MIN_ONNX_OPSET) -> bytes:
  """ONNX of `clips -> logits` with `variables` as constants (jax2onnx).

  Args:
    config: the config the variables were trained with.
    variables: `{'params': ..., 'batch_stats': ...}`.
    opset: the ONNX opset of the model, at least :data:`MIN_ONNX_OPSET`.

  Returns:
    The serialised `onnx.ModelProto`: input `clips` float32 `(B, T, S, S, 3)`, output
    `logits` float32 `(B, num_classes)`, `B` symbolic.

  Raises:
    ImportError: jax2onnx or onnxruntime is not installed (the message says how).
    ValueError: `opset` below :data:`MIN_ONNX_OPSET`.
  """
  _check_opset(opset)
  jax2onnx, _ = _import_onnx_tools()
  infer, clip = inference_function(onnx_traceable(config), variables, platform="cpu")
  with _quiet_converter_logs():
    model = jax2onnx.to_onnx(infer, inputs=[("B",) + clip], model_name="gta_jax",
                             opset=opset, input_names=["clips"], output_names=["logits"])
  return model.SerializeToString()


class OnnxMismatchError(RuntimeError):
  """onnxruntime's logits from the exported file differ from `model.apply`'s."""


def check_logits(got, want) -> float:
  """The largest absolute difference between onnxruntime's logits `got` and
  `model.apply`'s `want`.

  Raises:
    OnnxMismatchError: it is above :data:`ONNX_RTOL` of the largest |logit| plus
      :data:`ONNX_ATOL` (float32 rounding, accumulated over the network, stays far
      below).
  """
  import numpy as np  # pylint: disable=g-import-not-at-top
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  if got.shape != want.shape:
    raise OnnxMismatchError(f"onnxruntime gives logits of shape {got.shape}, model.apply "
                            f"{want.shape}")
  difference = float(np.abs(got - want).max())
  tolerance = ONNX_RTOL * float(np.abs(want).max()) + ONNX_ATOL
  if not difference <= tolerance:  # NaN too
    raise OnnxMismatchError(
        f"onnxruntime's logits differ from model.apply's by up to {difference:.2e} "
        f"(tolerance {tolerance:.2e}: {ONNX_RTOL:g} x max |logit| + {ONNX_ATOL:g}); the "
        f"conversion is wrong ({JAX2ONNX} is the version tested), nothing was written")
  return difference


def onnx_logits(data: bytes, config, variables, batch: int = 2):
  """onnxruntime's logits from the ONNX `data` and `model.apply`'s (the config's own
  kernels), on `batch` normal random clips: `(got, want)`."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from gta_jax.models import registry  # pylint: disable=g-import-not-at-top
  from gta_jax.training import state as state_lib  # pylint: disable=g-import-not-at-top
  _, onnxruntime = _import_onnx_tools()
  clips = np.random.default_rng(0).normal(
      size=state_lib.input_shape(config, batch)).astype(np.float32)
  session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
  (got,) = session.run(["logits"], {"clips": clips})
  model = registry.build_model(config)
  want = np.asarray(jax.jit(lambda x: model.apply(variables, x, train=False))(clips))
  return got, want


def onnx_difference(data: bytes, config, variables, batch: int = 2) -> float:
  """Largest absolute difference between onnxruntime's logits from the ONNX `data` and
  `model.apply`'s, on `batch` normal random clips, checked (:func:`check_logits`).

  Raises:
    OnnxMismatchError: the difference is above the tolerance.
  """
  return check_logits(*onnx_logits(data, config, variables, batch))


def run(config, workdir: str, out: str, platforms: Sequence[str] = PLATFORMS,
        step: Union[int, str] = "latest", export_format: str = "jax",
        onnx_opset: int = MIN_ONNX_OPSET) -> None:
  """Exports checkpoint `step` of `workdir` to the file `out`, and says what it wrote."""
  from gta_jax.training import checkpoint  # pylint: disable=g-import-not-at-top
  from gta_jax.training import sharding  # pylint: disable=g-import-not-at-top
  from gta_jax.training import state as state_lib  # pylint: disable=g-import-not-at-top
  if export_format not in FORMATS:
    raise ValueError(f"format must be one of {FORMATS}, got {export_format!r}")
  if export_format == "onnx":  # before the checkpoint is read
    _check_opset(onnx_opset)
    _import_onnx_tools()
  mesh = sharding.local_mesh()
  variables, step = checkpoint.restore_variables(config, workdir, step, mesh)
  _, *clip = state_lib.input_shape(config)
  if export_format == "onnx":
    data = export_onnx(config, variables, onnx_opset)
    difference = onnx_difference(data, config, variables)  # raises before writing
    what = (f"ONNX opset {onnx_opset}, input clips float32 (B, {', '.join(map(str, clip))}), "
            f"output logits (B, {config.model.num_classes}); onnxruntime against "
            f"model.apply on 2 random clips: max |difference| {difference:.1e}")
  else:
    exported, failures = export_model(config, variables, platforms)
    data = bytes(exported.serialize())
    for platform, error in failures.items():
      print(f"warning: not lowered for {platform}: {error}", file=sys.stderr)
    what = (f"platforms {','.join(exported.platforms)}, input float32 "
            f"{exported.in_avals[0].shape}, output {exported.out_avals[0].shape}")
  target = paths.path(out)
  target.parent.mkdir(parents=True, exist_ok=True)
  target.write_bytes(data)
  print(f"wrote {out} ({len(data) / 2**20:.1f} MiB): step {step}, {what}", flush=True)


def main(argv):
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  from gta_jax.training import writers  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  writers.quiet_library_logs()
  step = cli.checkpoint_step()
  try:
    run(f.config, f.workdir, f.out, f.platforms, step, f.format, f.onnx_opset)
  except (*cli.USER_ERRORS, ImportError, OnnxMismatchError) as e:
    return cli.report_error(e)
  return 0


def _define_flags() -> None:
  from absl import flags  # pylint: disable=g-import-not-at-top
  cli.define_run_flags()
  flags.DEFINE_string("out", None, "The file to write (e.g. model.jaxexport, model.onnx).")
  flags.DEFINE_enum("format", "jax", FORMATS, "jax: a jax.export file; onnx: an ONNX "
                    f"model (needs {ONNX_INSTALL}).")
  flags.DEFINE_list("platforms", list(PLATFORMS), "--format=jax: platforms to lower for; "
                    "those where the model does not lower are left out with a warning.")
  flags.DEFINE_integer("onnx_opset", MIN_ONNX_OPSET, "--format=onnx: the ONNX opset, "
                       f"{MIN_ONNX_OPSET} or above.")
  flags.mark_flag_as_required("out")


if __name__ == "__main__":
  from absl import app as _app  # pylint: disable=g-import-not-at-top
  _define_flags()
  _app.run(main)
