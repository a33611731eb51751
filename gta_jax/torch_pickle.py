"""Reads PyTorch `.pth` state dicts into numpy arrays without PyTorch or running code.

A `.pth` file written by `torch.save` (PyTorch >= 1.6) is a zip archive:
`<name>/data.pkl` is a pickle of the saved object, and each tensor's storage lies
raw in `<name>/data/<key>`. The pickle refers to storages by persistent id
`('storage', <storage type>, key, location, numel)` and rebuilds tensors with
`torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)`.

A pickle can call any importable function, so reading one with `pickle.load` runs
whatever the file asks for. :class:`RestrictedUnpickler` resolves only the globals a
state dict needs (the tensor and parameter rebuild calls, the typed storage classes,
`collections.OrderedDict`), each to a numpy stand-in written here; every other
global is refused with :class:`UnsafePickleError` naming it, before anything runs.

Files in the older format (PyTorch < 1.6, torch.save(..., _use_new_zipfile_serialization
=False)) are a sequence on one stream: pickles of a magic number, a protocol version
and system info, the object's pickle (persistent ids with a sixth field, always None
in practice), a pickle of the sorted storage keys, then each storage as an int64
element count and its raw bytes. They are read with the same unpickler, twice: once
with zero stand-ins to learn each storage's dtype and where the data begins, once with
the data.
"""

import collections
import os
import pickle
import sys
import zipfile
from typing import Any, Callable, Dict, Optional, Tuple

import ml_dtypes
import numpy as np


class UnsafePickleError(pickle.UnpicklingError):
  """The pickle asks for a global outside the allow-list."""


LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001


# torch's typed storage classes -> numpy dtype of their elements.
STORAGE_DTYPES: Dict[str, np.dtype] = {
    "DoubleStorage": np.dtype(np.float64),
    "FloatStorage": np.dtype(np.float32),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
}


class _Sealed:
  """Refuses pickle's BUILD, which would otherwise set any attribute from the file."""

  def __setstate__(self, state):
    raise pickle.UnpicklingError(f"refusing to set the state of {self!r} from the file")


class StorageType(_Sealed):
  """Stands for a `torch.<X>Storage` class in a persistent id: only its dtype."""

  def __init__(self, name: str):
    self.name = name
    self.dtype = STORAGE_DTYPES[name]

  def __repr__(self):
    return f"torch.{self.name}"


class StorageStandIn(_Sealed):
  """A storage whose data is not read yet: tensors on it are checked, not built."""
  ndim = 1

  def __init__(self, dtype: np.dtype, size: int):
    self.dtype, self.size = dtype, size


def _check_ints(name: str, values: Any, size: int = -1) -> Tuple[int, ...]:
  if (not isinstance(values, tuple) or (size >= 0 and len(values) != size)
      or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                 for v in values)):
    raise pickle.UnpicklingError(f"tensor {name} must be a tuple of non-negative "
                                 f"ints, got {values!r}")
  return values


def rebuild_tensor(storage: np.ndarray, storage_offset: int, size: Tuple[int, ...],
                   stride: Tuple[int, ...], *unused_args, **unused_kwargs) -> np.ndarray:
  """`torch._utils._rebuild_tensor_v2` on numpy: a strided view, copied.

  The requires-grad flag, backward hooks and metadata that follow are ignored.
  The view is checked to lie inside the storage before it is taken.
  """
  if not isinstance(storage, (np.ndarray, StorageStandIn)) or storage.ndim != 1 or (
      isinstance(storage, np.ndarray) and storage.strides != (storage.itemsize,)):
    raise pickle.UnpicklingError(f"a tensor's storage must come from the archive, "
                                 f"got {type(storage).__name__}")
  (storage_offset,) = _check_ints("offset", (storage_offset,))
  size = _check_ints("size", tuple(size))
  stride = _check_ints("stride", tuple(stride), len(size))
  if 0 in size or isinstance(storage, StorageStandIn):
    return np.zeros(size if 0 in size else 0, storage.dtype)
  last = storage_offset + sum((n - 1) * s for n, s in zip(size, stride))
  if last >= storage.size:
    raise pickle.UnpicklingError(
        f"tensor of size {size}, stride {stride} at offset {storage_offset} runs "
        f"past its storage of {storage.size} elements")
  view = np.lib.stride_tricks.as_strided(
      storage[storage_offset:], size, tuple(s * storage.itemsize for s in stride),
      writeable=False)
  return np.array(view)


def rebuild_parameter(data: np.ndarray, *unused_args) -> np.ndarray:
  """`torch._utils._rebuild_parameter[_with_state]`: the parameter's data."""
  if not isinstance(data, np.ndarray):
    raise pickle.UnpicklingError(f"a parameter must wrap a tensor, got "
                                 f"{type(data).__name__}")
  return data


ALLOWED_GLOBALS: Dict[Tuple[str, str], Callable[..., Any]] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): rebuild_parameter,
}


class RestrictedUnpickler(pickle.Unpickler):
  """Unpickles a state dict, resolving only :data:`ALLOWED_GLOBALS` and storages.

  Args:
    file: the pickle stream.
    load_storage: `(key, dtype, numel) -> 1-D array`, the storage record `key`;
      None where the pickle must hold no tensors.
    source: the file's name, for messages.
  """

  def __init__(self, file,
               load_storage: Optional[Callable[[str, np.dtype, int], np.ndarray]],
               source: str):
    super().__init__(file)
    self._load_storage = load_storage
    self._source = source
    self._storages: Dict[str, np.ndarray] = {}

  def find_class(self, module: str, name: str) -> Any:
    if module == "torch" and name in STORAGE_DTYPES:
      return StorageType(name)
    if (module, name) in ALLOWED_GLOBALS:
      return ALLOWED_GLOBALS[(module, name)]
    raise UnsafePickleError(
        f"{self._source}: refusing to load global '{module}.{name}': a state dict "
        f"needs only tensors, storages and OrderedDict, and loading this global "
        f"could run code from the file. If you trust the file, load it with "
        f"PyTorch and re-save its state_dict() or convert it to .safetensors")

  def persistent_load(self, pid: Any) -> np.ndarray:
    # (storage, type, key, location, numel), and a None view in the legacy format.
    if (not isinstance(pid, tuple) or len(pid) not in (5, 6) or pid[0] != "storage"
        or not isinstance(pid[1], StorageType) or not isinstance(pid[2], str)
        or not isinstance(pid[4], int) or pid[5:] not in ((), (None,))
        or self._load_storage is None):
      raise pickle.UnpicklingError(f"{self._source}: unexpected persistent id {pid!r}")
    _, storage_type, key, _, numel = pid[:5]
    if key not in self._storages:
      self._storages[key] = self._load_storage(key, storage_type.dtype, numel)
    storage = self._storages[key]
    if np.dtype(storage.dtype) != storage_type.dtype:
      raise pickle.UnpicklingError(
          f"{self._source}: storage {key} is read as {storage.dtype} and as "
          f"{storage_type.dtype}")
    return storage


def _archive_prefix(archive: zipfile.ZipFile, path: str) -> str:
  pickles = [n for n in archive.namelist() if n.endswith("data.pkl")
             and n.count("/") <= 1]
  if len(pickles) != 1:
    raise ValueError(f"{path}: not a PyTorch zip checkpoint (expected one "
                     f"'<name>/data.pkl' record, found {pickles})")
  return pickles[0][:-len("data.pkl")]


def _check_storage(data: bytes, dtype: np.dtype, numel: int, record: str,
                   path: str) -> None:
  if numel < 0 or len(data) < numel * dtype.itemsize:
    raise ValueError(f"{path}: storage {record!r} holds {len(data)} bytes, fewer "
                     f"than {numel} x {dtype}")


def _load_zip(path: str) -> Any:
  with zipfile.ZipFile(path) as archive:
    prefix = _archive_prefix(archive, path)
    names = set(archive.namelist())
    big_endian = (prefix + "byteorder" in names
                  and archive.read(prefix + "byteorder").strip() == b"big")

    def load_storage(key: str, dtype: np.dtype, numel: int) -> np.ndarray:
      record = f"{prefix}data/{key}"
      if record not in names:
        raise ValueError(f"{path}: storage record {record!r} is missing")
      data = archive.read(record)
      _check_storage(data, dtype, numel, record, path)
      storage = np.frombuffer(data, dtype, count=numel)
      if big_endian and dtype.itemsize > 1:
        storage = storage.view(f"u{dtype.itemsize}").byteswap().view(dtype)
      return storage

    with archive.open(prefix + "data.pkl") as pkl:
      return RestrictedUnpickler(pkl, load_storage, path).load()


def _load_legacy(path: str) -> Any:
  with open(path, "rb") as f:
    header = [RestrictedUnpickler(f, None, path).load() for _ in range(3)]
    if header[0] != LEGACY_MAGIC or header[1] != LEGACY_PROTOCOL:
      raise ValueError(f"{path}: not a PyTorch checkpoint (no zip archive, no legacy "
                       f"magic number)")
    if not header[2].get("little_endian", True) or sys.byteorder != "little":
      raise ValueError(f"{path}: big-endian legacy checkpoints are not supported")
    start = f.tell()
    dtypes = {}

    def stand_in(key: str, dtype: np.dtype, numel: int) -> np.ndarray:
      dtypes[key] = dtype
      return StorageStandIn(dtype, numel)

    RestrictedUnpickler(f, stand_in, path).load()
    keys = RestrictedUnpickler(f, None, path).load()
    if not isinstance(keys, list) or sorted(keys) != sorted(dtypes):
      raise ValueError(f"{path}: storage keys {keys!r} do not match the tensors'")
    storages = {}
    for key in keys:
      size = f.read(8)
      numel = int(np.frombuffer(size, "<i8")[0]) if len(size) == 8 else -1
      data = f.read(max(numel, 0) * dtypes[key].itemsize)
      _check_storage(data, dtypes[key], numel, key, path)
      storages[key] = np.frombuffer(data, dtypes[key])

    def load_storage(key: str, dtype: np.dtype, numel: int) -> np.ndarray:
      del dtype  # checked by the unpickler against the first pass's
      if numel > storages[key].size:
        raise ValueError(f"{path}: storage {key!r} has {storages[key].size} "
                         f"elements, a tensor expects {numel}")
      return storages[key]

    f.seek(start)
    return RestrictedUnpickler(f, load_storage, path).load()


def load(path: str) -> Any:
  """Loads the object `torch.save` wrote to `path`, with tensors as numpy arrays.

  Args:
    path: a `.pth`/`.pt`/`.bin` file, PyTorch's zip format or the legacy one.

  Returns:
    The saved object (for a state dict, an `OrderedDict` of name -> array).

  Raises:
    UnsafePickleError: the pickle names a global outside the allow-list.
    ValueError: not a PyTorch checkpoint, or a storage is missing or short.
  """
  path = os.fspath(path)
  if zipfile.is_zipfile(path):
    return _load_zip(path)
  try:
    return _load_legacy(path)
  except (pickle.UnpicklingError, EOFError, AttributeError) as e:
    if isinstance(e, UnsafePickleError):
      raise
    raise ValueError(f"{path}: not a PyTorch checkpoint (neither the zip format nor "
                     f"the legacy one): {e}") from None
