r"""Exports a checkpoint's model with `jax.export`, for serving without this package.

  python -m gta_jax.export --config configs/X.py --workdir DIR --out model.jaxexport \
      [--platforms cpu,cuda,tpu] [--checkpoint_step latest|best|N] [--config.a.b=value ...]

The file holds the inference function with the parameters inside: a normalised clip
`(B, T, S, S, 3)` float32 (ImageNet mean/std, channels last, `T = data.num_frames`,
`S = data.crop_size`; B is symbolic) in, logits `(B, num_classes)` float32 out. It is
lowered once for every platform of `--platforms` where the model lowers (a platform
that fails is named and left out; `cpu` must work). The model is traced with the
platform-neutral kernels (`attention_impl='xla'`, no XLA:CPU-only kernels), so one
trace serves every platform. Reading it needs only `jax` (and `flatbuffers`):

  from jax import export
  exported = export.deserialize(open("model.jaxexport", "rb").read())
  logits = exported.call(clips)          # clips: float32 (B, T, S, S, 3)

Multi-view testing is the caller's: average the softmax over the views of a video.

ONNX is not offered: jax2onnx 0.17.1 converts these models (TSN, TSM, Non-local,
GTA and SSA, with a symbolic batch, onnxruntime within 5e-8 of `model.apply` on the
tiny configs), but it declares `orbax-checkpoint<0.11.37`, which cannot be installed
beside this project's orbax-checkpoint>=0.12.8.
"""

from __future__ import annotations

import sys
from typing import Sequence, Union

from gta_jax import cli
from gta_jax import paths

PLATFORMS = ("cpu", "cuda", "tpu")


def portable(config):
  """`config` with the kernels every platform has (see the module docstring)."""
  config = config.copy_and_resolve_references()
  config.model.attention_impl = "xla"
  config.model.cpu_kernels = False
  return config


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
  from gta_jax.models import registry  # pylint: disable=g-import-not-at-top
  from gta_jax.training import state as state_lib  # pylint: disable=g-import-not-at-top
  unknown = sorted(set(platforms) - set(PLATFORMS))
  if unknown or not platforms:
    raise ValueError(f"platforms must be some of {PLATFORMS}, got {list(platforms)}")
  config = portable(config)
  model = registry.build_model(config)
  variables = jax.device_get(variables)
  infer = jax.jit(lambda clips: model.apply(variables, clips, train=False))
  batch, *clip = state_lib.input_shape(config)
  del batch
  spec = jax.ShapeDtypeStruct(export.symbolic_shape("b") + tuple(clip), jnp.float32)
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


def run(config, workdir: str, out: str, platforms: Sequence[str] = PLATFORMS,
        step: Union[int, str] = "latest") -> None:
  """Exports checkpoint `step` of `workdir` to the file `out`, and says what it wrote."""
  from gta_jax.training import checkpoint  # pylint: disable=g-import-not-at-top
  from gta_jax.training import sharding  # pylint: disable=g-import-not-at-top
  mesh = sharding.local_mesh()
  variables, step = checkpoint.restore_variables(config, workdir, step, mesh)
  exported, failures = export_model(config, variables, platforms)
  data = exported.serialize()
  target = paths.path(out)
  target.parent.mkdir(parents=True, exist_ok=True)
  target.write_bytes(bytes(data))
  for platform, error in failures.items():
    print(f"warning: not lowered for {platform}: {error}", file=sys.stderr)
  shape = exported.in_avals[0].shape
  print(f"wrote {out} ({len(data) / 2**20:.1f} MiB): step {step}, platforms "
        f"{','.join(exported.platforms)}, input float32 {shape}, output "
        f"{exported.out_avals[0].shape}", flush=True)


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
    run(f.config, f.workdir, f.out, f.platforms, step)
  except cli.USER_ERRORS as e:
    return cli.report_error(e)
  return 0


def _define_flags() -> None:
  from absl import flags  # pylint: disable=g-import-not-at-top
  cli.define_run_flags()
  flags.DEFINE_string("out", None, "The file to write (e.g. model.jaxexport).")
  flags.DEFINE_list("platforms", list(PLATFORMS), "Platforms to lower for; those where "
                    "the model does not lower are left out with a warning.")
  flags.mark_flag_as_required("out")


if __name__ == "__main__":
  from absl import app as _app  # pylint: disable=g-import-not-at-top
  _define_flags()
  _app.run(main)
