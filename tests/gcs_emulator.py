"""A local Google Cloud Storage for tests: `gcp-storage-emulator` with three gaps filled.

The emulator (pure Python, in memory) serves the GCS JSON API on 127.0.0.1. Real
clients need three things it lacks (../shared/DESIGN.md, "Testing cloud paths"),
added here by wrapping its object handlers before the server starts:

* media downloads carry the object's `x-goog-generation` header;
* `ifGenerationMatch` / `ifGenerationNotMatch` answer 412 / 304 (tensorstore's
  OCDBT manifest reads and conditional writes rely on them);
* a suffix range `Range: bytes=-N` returns the last N bytes (array_record's reader
  opens large files that way).

`serve()` starts it with a bucket; its `env` holds the variables through which each
client (gcsfs and google-cloud-storage, tensorstore, array_record) finds it, without
credentials or network.
"""

import contextlib
import functools
import re
import socket
from http import HTTPStatus
from typing import Dict, Iterator, List, Optional

from gcp_storage_emulator import server as emulator_server
from gcp_storage_emulator.exceptions import NotFound
from gcp_storage_emulator.handlers import objects

_SUFFIX_RANGE = re.compile(r"^\s*bytes=-(?P<length>[0-9]+)\s*$")


def _generation(storage, bucket: str, name: Optional[str]) -> str:
  """The object's generation; '0' when it does not exist (GCS's convention)."""
  if not name:
    return "0"
  try:
    return str(storage.get_file_obj(bucket, name)["generation"])
  except NotFound:
    return "0"


def _object_name(request) -> Optional[str]:
  """The object a request is about: in the path, the upload's `name` query, or the
  name in the upload's metadata (resumable: the body; multipart: its `meta` part)."""
  name = request.params.get("object_id")
  if name is None and request.query.get("name"):
    name = request.query["name"][0]
  if name is None and isinstance(request.data, dict):
    name = request.data.get("name") or (request.data.get("meta") or {}).get("name")
  return name


def _precondition_failed(request, response, storage, read: bool) -> bool:
  """Answers 412 (or 304 on a read's `ifGenerationNotMatch`); True if it did."""
  query = request.query
  if "ifGenerationMatch" not in query and "ifGenerationNotMatch" not in query:
    return False
  current = _generation(storage, request.params["bucket_name"], _object_name(request))
  if "ifGenerationMatch" in query and query["ifGenerationMatch"][0] != current:
    response.status = HTTPStatus.PRECONDITION_FAILED
    return True
  if "ifGenerationNotMatch" in query and query["ifGenerationNotMatch"][0] == current:
    response.status = HTTPStatus.NOT_MODIFIED if read else HTTPStatus.PRECONDITION_FAILED
    return True
  return False


def _with_preconditions(handler, read: bool):
  @functools.wraps(handler)
  def wrapped(request, response, storage, *args, **kwargs):
    if _precondition_failed(request, response, storage, read):
      return None
    return handler(request, response, storage, *args, **kwargs)
  return wrapped


def _download(request, response, storage, *args, **kwargs):
  """`objects.download` with suffix ranges and the `x-goog-generation` header."""
  bucket, name = request.params["bucket_name"], request.params["object_id"]
  headers = request._request_handler.headers  # pylint: disable=protected-access
  match = _SUFFIX_RANGE.match(headers.get("range", "") or "")
  if match:
    try:
      size = len(storage.get_file(bucket, name))
    except NotFound:
      size = 0
    del headers["range"]
    headers["range"] = f"bytes={max(0, size - int(match['length']))}-"
  objects.download(request, response, storage, *args, **kwargs)
  if response.status == HTTPStatus.OK or response.status == HTTPStatus.PARTIAL_CONTENT:
    response["x-goog-generation"] = _generation(storage, bucket, name)


def _get(request, response, storage, *args, **kwargs):
  if request.query.get("alt") and request.query["alt"][0] == "media":
    return _download(request, response, storage, *args, **kwargs)
  return objects.get(request, response, storage, *args, **kwargs)


_REPLACEMENTS = {
    objects.download: _with_preconditions(_download, read=True),
    objects.get: _with_preconditions(_get, read=True),
    objects.insert: _with_preconditions(objects.insert, read=False),
    objects.delete: _with_preconditions(objects.delete, read=False),
}


def _patch_handlers() -> None:
  """Swaps the wrapped handlers into the emulator's routing table (idempotent)."""
  for _, handlers in emulator_server.HANDLERS:
    for method, handler in list(handlers.items()):
      if handler in _REPLACEMENTS:
        handlers[method] = _REPLACEMENTS[handler]


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def client_environment(url: str) -> Dict[str, str]:
  """The variables through which each client finds the emulator at `url`."""
  return {
      "STORAGE_EMULATOR_HOST": url,  # gcsfs (etils.epath), google-cloud-storage
      "TENSORSTORE_GCS_HTTP_URL": url,  # tensorstore (orbax's arrays)
      "CLOUD_STORAGE_EMULATOR_ENDPOINT": url,  # array_record's own GCS reader
      "GOOGLE_AUTH_TOKEN_FOR_TESTING": "dummy",  # no credential look-ups
      "GOOGLE_CLOUD_PROJECT": "test",
      # gcsfs's default file system asks the Storage Control API (not emulated) for
      # each bucket's layout, and warns at every call when it cannot.
      "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
  }


class Emulator:
  """A running emulator: the clients' environment, and a look at what it stores."""

  def __init__(self, server, url: str):
    self.env = client_environment(url)
    self._storage = server._storage  # pylint: disable=protected-access

  def names(self, bucket: str, prefix: str = "") -> List[str]:
    """The objects under `prefix`, read from the store (no client, so no client
    cache goes stale: gcsfs caches the listings it makes)."""
    return sorted(n for n in self._storage.objects.get(bucket, {}) if n.startswith(prefix))


@contextlib.contextmanager
def serve(bucket: str) -> Iterator[Emulator]:
  """Runs the emulator (in this process, in memory) with `bucket`."""
  _patch_handlers()
  port = free_port()
  server = emulator_server.create_server("127.0.0.1", port, in_memory=True,
                                         default_bucket=bucket)
  server.start()
  try:
    yield Emulator(server, f"http://127.0.0.1:{port}")
  finally:
    server.stop()
