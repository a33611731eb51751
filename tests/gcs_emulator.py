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

It can also behave like a bucket on a bad day (`Emulator.faulty`, :class:`Faults`):
a set fraction of requests is answered 429 or 503, another has its connection
dropped mid-body, and every request can be delayed; it counts what it did.
"""

import collections
import contextlib
import dataclasses
import functools
import io
import json
import random
import re
import socket
import sys
import threading
import time
from http import HTTPStatus
from http import server as http_server
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


# Fault injection ------------------------------------------------------------------------


@dataclasses.dataclass
class Faults:
  """How often the emulator fails a request, and what it did so far.

  Attributes:
    error_rate: the fraction of requests answered 429 or 503 (half each, drawn at
      random) before the emulator looks at them: nothing is written.
    drop_rate: the fraction of requests whose connection is closed mid-body: a
      download gets its headers and half its bytes; an upload (a request with a body)
      is read half-way and never stored. Requests that are neither (a delete, a copy)
      are answered 503 instead, so that a dropped request never half-happens.
    latency_s: seconds added to every request (the server is single-threaded, so
      this slows everything down: keep it to milliseconds).
    seed: of the draws (the clients' request order still varies between runs).
    counts: what was done: `requests`, `429`, `503`, `dropped`.
    by_client: the faults by `(client, fault)`, the client named by the first word
      of its User-Agent: `python-gcsfs`, `tensorstore`, `gl-cpp` (array_record's
      google-cloud-cpp), `gcloud-python` (google-cloud-storage).
  """
  error_rate: float = 0.0
  drop_rate: float = 0.0
  latency_s: float = 0.0
  seed: int = 0
  counts: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  by_client: collections.Counter = dataclasses.field(default_factory=collections.Counter)

  def __post_init__(self):
    if not 0 <= self.error_rate + self.drop_rate <= 1:
      raise ValueError(f"error_rate + drop_rate must be in [0, 1], got {self}")
    self._random = random.Random(self.seed)
    self._lock = threading.Lock()

  @property
  def faulted(self) -> int:
    """How many requests were failed (answered 429/503 or dropped)."""
    return self.counts["429"] + self.counts["503"] + self.counts["dropped"]

  def draw(self, droppable: bool, client: str) -> Optional[str]:
    """The fault for the next request: None, '429', '503' or 'dropped'; `client` (its
    User-Agent's first word) is counted with the fault in `by_client`."""
    with self._lock:
      u = self._random.random()
      self.counts["requests"] += 1
      if u < self.error_rate:
        fault = "429" if u < self.error_rate / 2 else "503"
      elif u < self.error_rate + self.drop_rate:
        fault = "dropped" if droppable else "503"
      else:
        return None
      self.counts[fault] += 1
      self.by_client[client, fault] += 1
      return fault


_NO_FAULTS = Faults()
_ERROR_BODY = {"429": (HTTPStatus.TOO_MANY_REQUESTS, "rateLimitExceeded"),
               "503": (HTTPStatus.SERVICE_UNAVAILABLE, "backendError")}


class _FaultyHandler(emulator_server.RequestHandler):
  """The emulator's request handler, failing requests as `self.server.faults` says."""

  def do_GET(self):
    self._serve(emulator_server.GET)

  def do_POST(self):
    self._serve(emulator_server.POST)

  def do_PUT(self):
    self._serve(emulator_server.PUT)

  def do_DELETE(self):
    self._serve(emulator_server.DELETE)

  def do_PATCH(self):
    self._serve(emulator_server.PATCH)

  def _body_length(self) -> int:
    return int(self.headers.get("Content-Length") or 0)

  def _serve(self, method: str) -> None:
    faults = self.server.faults
    if faults.latency_s:
      time.sleep(faults.latency_s)
    has_body = self._body_length() > 0
    client = (self.headers.get("User-Agent") or "unknown").split("/")[0].split()[0]
    fault = faults.draw(droppable=method == emulator_server.GET or has_body,
                        client=client)
    if fault is None:
      emulator_server.Router(self).handle(method)
    elif fault == "dropped" and has_body:
      self.rfile.read(self._body_length() // 2)
      self._hang_up()
    elif fault == "dropped":
      self._send_half_a_response(method)
    else:
      self._refuse(fault)

  def _refuse(self, fault: str) -> None:
    """Answers 429/503 with GCS's error body, after reading the request's body."""
    self.rfile.read(self._body_length())
    status, reason = _ERROR_BODY[fault]
    body = json.dumps({"error": {"code": status.value, "message": f"injected {fault}",
                                 "errors": [{"reason": reason}]}}).encode()
    self.send_response(status.value)
    self.send_header("Content-Type", "application/json")
    self.send_header("Content-Length", str(len(body)))
    self.end_headers()
    self.wfile.write(body)

  def _send_half_a_response(self, method: str) -> None:
    """Serves the request into a buffer, then sends its headers and half its body
    (nothing at all if it has no body: half of it would be all of it)."""
    wfile, self.wfile = self.wfile, io.BytesIO()
    try:
      emulator_server.Router(self).handle(method)
      response = self.wfile.getvalue()
    finally:
      self.wfile = wfile
    head, _, body = response.partition(b"\r\n\r\n")
    if body:
      self.wfile.write(head + b"\r\n\r\n" + body[:len(body) // 2])
    self._hang_up()

  def _hang_up(self) -> None:
    self.wfile.flush()
    self.close_connection = True
    with contextlib.suppress(OSError):  # the client may have hung up first
      self.connection.shutdown(socket.SHUT_RDWR)


class _FaultyServer(http_server.HTTPServer):
  faults: Faults = _NO_FAULTS

  def handle_error(self, request, client_address):
    """Prints the traceback, unless a client hung up (after a fault: its business)."""
    if not isinstance(sys.exc_info()[1], ConnectionError):
      super().handle_error(request, client_address)


class _FaultyAPIThread(emulator_server.APIThread):
  """The emulator's server thread, serving with :class:`_FaultyHandler`."""

  def run(self):
    self._httpd = _FaultyServer((self._host, self._port),
                                functools.partial(_FaultyHandler, self._storage))
    self.is_running.set()
    self._httpd.serve_forever()


class Emulator:
  """A running emulator: the clients' environment, and a look at what it stores."""

  def __init__(self, server, url: str):
    self.env = client_environment(url)
    self._storage = server._storage  # pylint: disable=protected-access
    self._httpd = server._api._httpd  # pylint: disable=protected-access

  def names(self, bucket: str, prefix: str = "") -> List[str]:
    """The objects under `prefix`, read from the store (no client, so no client
    cache goes stale: gcsfs caches the listings it makes)."""
    return sorted(n for n in self._storage.objects.get(bucket, {}) if n.startswith(prefix))

  @contextlib.contextmanager
  def faulty(self, **settings) -> Iterator[Faults]:
    """Fails requests as `Faults(**settings)` says until the block ends; yields the
    `Faults`, whose `counts` tell what was done."""
    faults = Faults(**settings)
    self._httpd.faults = faults
    try:
      yield faults
    finally:
      self._httpd.faults = _NO_FAULTS


@contextlib.contextmanager
def serve(bucket: str) -> Iterator[Emulator]:
  """Runs the emulator (in this process, in memory) with `bucket`."""
  _patch_handlers()
  port = free_port()
  server = emulator_server.create_server("127.0.0.1", port, in_memory=True,
                                         default_bucket=bucket)
  server._api = _FaultyAPIThread("127.0.0.1", port, server._storage)  # pylint: disable=protected-access
  server.start()
  try:
    yield Emulator(server, f"http://127.0.0.1:{port}")
  finally:
    server.stop()
