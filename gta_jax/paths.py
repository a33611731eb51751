"""The one place that turns the paths users give into `etils.epath.Path`s.

A workdir, `data.data_dir`, `data.manual_dir`, `model.pretrained` or an output folder
may be local (`./runs/x`, `~/data`) or any URL `etils.epath` opens (`gs://bucket/run`,
through gcsfs without TensorFlow). Local paths are expanded (`~`) and made absolute,
as orbax requires; URLs are kept as given. Everything else in the project reads and
writes user paths through the `epath.Path` these functions return.

The first URL turns on the project's retries of bucket requests (`gta_jax.retries`:
bounded, with backoff, logged) in gcsfs and orbax's tensorstore.
"""

import contextlib
import io
import os
import shutil
import tempfile
from typing import Iterator, Union

from etils import epath

from gta_jax import retries

PathLike = Union[str, os.PathLike]


def is_local(path: PathLike) -> bool:
  """Whether `path` is on this machine's file system (no `scheme://`)."""
  return "://" not in os.fspath(path)


def path(p: PathLike) -> epath.Path:
  """`p` as an `epath.Path`: local ones expanded and absolute, URLs as given."""
  p = os.fspath(p)
  if is_local(p):
    p = os.path.abspath(os.path.expanduser(p))
  else:
    retries.install()
  return epath.Path(p)


def name(p: PathLike) -> str:
  """The last component of `p` (`gs://b/runs/x/` -> `x`)."""
  return path(p).name


def save_figure(figure, p: PathLike, **savefig_kwargs) -> epath.Path:
  """Saves a matplotlib figure to `p` (local or remote); returns the path."""
  out = path(p)
  buffer = io.BytesIO()
  figure.savefig(buffer, format=out.suffix.lstrip(".") or "png", **savefig_kwargs)
  out.write_bytes(buffer.getvalue())
  return out


@contextlib.contextmanager
def local_file(p: PathLike) -> Iterator[str]:
  """A local file name for `p`: itself if local, else a temporary copy (for decoders
  that only open local files); the copy is removed on exit."""
  if is_local(p):
    yield os.fspath(path(p))
    return
  source = path(p)
  with tempfile.TemporaryDirectory(prefix="gta_jax_") as folder:
    copy = os.path.join(folder, source.name)
    with source.open("rb") as src, open(copy, "wb") as dst:
      shutil.copyfileobj(src, dst, length=16 << 20)
    yield copy
