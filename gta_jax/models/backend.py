"""Which implementation each op gets, decided per backend: one policy.

The models are written once; a few ops have several implementations, and which
one runs depends on the platform the computation is traced for:

| op | CPU | GPU | TPU |
|---|---|---|---|
| softmax attention (`attention.attend`) | `custom` (hand-written VJP) | `cudnn` where dtype and head size allow, else `xla` | `pallas` flash attention for long sequences, else `xla` |
| 1x1 convolution, stem max-pool | `cpu_kernels` (hand-written VJPs) | `lax` / `flax` | `lax` / `flax` |

`config.model.attention_impl` overrides the attention choice (`custom`, `xla`,
`cudnn`, `pallas`; `auto` is the table) and `config.model.cpu_kernels=False`
turns the XLA:CPU kernels off. The model applies them while it is traced
(:func:`options`, entered by `VideoResNet`); :func:`force_platform` traces for
another platform than this process's default backend, which is how
`tests/test_lowering.py` lowers for `cuda` and `tpu` on a CPU machine.
"""

import contextlib
import contextvars
import dataclasses
from typing import Iterator, Optional

import jax
import jax.numpy as jnp

ATTENTION_IMPLS = ("auto", "custom", "xla", "cudnn", "pallas")
PLATFORMS = ("cpu", "gpu", "tpu")
# Where the kernels exist: a forced `cudnn` or `pallas` elsewhere is an error.
KERNEL_PLATFORMS = {"cudnn": "gpu", "pallas": "tpu"}
# `auto` on TPU takes the Pallas flash kernel from this many queries and keys on
# (the 3D Non-local's T*H*W = 8*28*28 = 6272): below it the L x L scores that
# XLA's path materialises are small. Chosen for memory, not measured on a TPU.
PALLAS_MIN_LENGTH = 2048
PALLAS_BLOCK = 128  # the flash kernel's default block; lengths must divide by it
CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)
CUDNN_MAX_HEAD_SIZE = 128


@dataclasses.dataclass(frozen=True)
class Policy:
  """The choices in force while a computation is traced.

  Attributes:
    platform: `cpu`, `gpu` or `tpu`: the one traced for.
    attention_impl: one of :data:`ATTENTION_IMPLS`.
    cpu_kernels: use the XLA:CPU kernels (`cpu_kernels.py`) when on CPU.
  """
  platform: str
  attention_impl: str = "auto"
  cpu_kernels: bool = True

  @property
  def use_cpu_kernels(self) -> bool:
    return self.cpu_kernels and self.platform == "cpu"


_PLATFORM: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar(
    "gta_jax_platform", default=None)
_OPTIONS: contextvars.ContextVar[tuple] = contextvars.ContextVar(
    "gta_jax_backend_options", default=("auto", True))


def check_attention_impl(impl: str, key: str = "config.model.attention_impl") -> str:
  if impl not in ATTENTION_IMPLS:
    raise ValueError(f"{key} must be one of {ATTENTION_IMPLS}, got {impl!r}")
  return impl


def default_platform() -> str:
  """This process's default backend as `cpu`, `gpu` or `tpu`."""
  platform = jax.default_backend()
  return "gpu" if platform in ("cuda", "rocm") else platform


@contextlib.contextmanager
def force_platform(platform: str) -> Iterator[None]:
  """Ops traced in this block take `platform`'s choices (e.g. for `jax.export`)."""
  if platform not in PLATFORMS:
    raise ValueError(f"platform must be one of {PLATFORMS}, got {platform!r}")
  token = _PLATFORM.set(platform)
  try:
    yield
  finally:
    _PLATFORM.reset(token)


@contextlib.contextmanager
def options(attention_impl: str = "auto", cpu_kernels: bool = True) -> Iterator[None]:
  """Ops traced in this block use these overrides (a model's config)."""
  token = _OPTIONS.set((check_attention_impl(attention_impl), bool(cpu_kernels)))
  try:
    yield
  finally:
    _OPTIONS.reset(token)


def current() -> Policy:
  """The policy for ops traced now."""
  attention_impl, cpu_kernels = _OPTIONS.get()
  return Policy(_PLATFORM.get() or default_platform(), attention_impl, cpu_kernels)


def cudnn_supports(dtype, head_size: int) -> bool:
  """cuDNN's fused attention: bf16/fp16 inputs, head size <= 128 and a multiple
  of 8 (what can be known without a GPU to ask)."""
  return (jnp.dtype(dtype) in map(jnp.dtype, CUDNN_DTYPES)
          and head_size <= CUDNN_MAX_HEAD_SIZE and head_size % 8 == 0)


def pallas_supports(query_length: int, key_length: int) -> bool:
  """The Pallas TPU flash kernel: lengths that divide into its blocks."""
  return query_length % PALLAS_BLOCK == 0 and key_length % PALLAS_BLOCK == 0


def attention_impl(dtype, head_size: int, query_length: int, key_length: int,
                   policy: Optional[Policy] = None) -> str:
  """The implementation of one softmax attention: `custom`, `xla`, `cudnn` or `pallas`.

  `auto` follows the module docstring's table. A forced `custom` or `xla` is
  used for every attention; a forced `cudnn` or `pallas` for every attention
  the kernel supports, `xla` for the others (SSA's channel and temporal
  attention have head sizes in the thousands).

  Raises:
    ValueError: `cudnn` off GPU or `pallas` off TPU.
  """
  policy = policy or current()
  impl = policy.attention_impl
  if impl in KERNEL_PLATFORMS and policy.platform != KERNEL_PLATFORMS[impl]:
    raise ValueError(f"config.model.attention_impl={impl!r} needs a "
                     f"{KERNEL_PLATFORMS[impl].upper()}, but this computation is for "
                     f"{policy.platform!r}")
  if impl == "auto":
    impl = {"cpu": "custom", "gpu": "cudnn", "tpu": "pallas"}[policy.platform]
    if impl == "pallas" and min(query_length, key_length) < PALLAS_MIN_LENGTH:
      impl = "xla"
  if impl == "cudnn" and not cudnn_supports(dtype, head_size):
    return "xla"
  if impl == "pallas" and not pallas_supports(query_length, key_length):
    return "xla"
  return impl
