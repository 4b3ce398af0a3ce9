"""``sslrec-serve``: an export behind a small HTTP server (Starlette + uvicorn: extra ``serve``).

    sslrec-serve --export=exports/base [--host=127.0.0.1] [--port=8080] [--method=exact|ann]

Binds to 127.0.0.1 (this machine only) unless ``--host`` says otherwise. JSON in, JSON out:

* ``GET /health`` -> ``{"status": "ok", "step", "num_items", "dim", "method"}``.
* ``POST /search`` with ``{"queries": [{feature: value(s)}, ...], "k": 10}`` (or ``"query": {...}``
  for one), optional ``"method"`` ('exact' / 'ann'), ``"exclude"`` and ``"allow"`` (item keys: one
  list for every query, or one list per query; ``sslrec.serving.filters``) ->
  ``{"results": [{"keys": [...], "scores": [...], "names": [...]}, ...], "method", "notes",
  "step"}``: one result per query, in order.
* ``POST /similar`` with ``{"items": [key, ...]}`` (or ``"item": key``) and the same options ->
  the same shape: the items closest to each given item.

Every bad request gets a JSON body ``{"error": "one line"}`` and a status code, never a dropped
connection: 400 for a body that is not JSON or not an object, a missing or unknown field, a bad
value, an unknown feature or item key (the ``ServingError`` line); 404 / 405 for another path or
method; 413 for a body over ``--max_body_bytes``; 500 (logged) for anything unexpected.

Requests are answered in a thread pool (``Retriever`` is thread-safe), so concurrent clients are
served while one request computes; send several queries in one request where you can (the query
tower and the search are batched). Latency and throughput: docs/serving.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import socket
import sys
import warnings
from collections.abc import Sequence

from sslrec.serving import ann
from sslrec.serving.format import ServingError, ServingWarning
from sslrec.serving.retriever import Results, Retriever

try:  # the optional ``serve`` extra; main() and create_app() say what to install without it
  import uvicorn
  from starlette.applications import Starlette
  from starlette.concurrency import run_in_threadpool
  from starlette.exceptions import HTTPException
  from starlette.requests import Request
  from starlette.responses import JSONResponse
  from starlette.routing import Route
except ImportError as e:  # pragma: no cover - depends on the environment
  _MISSING = e
else:
  _MISSING = None

DEFAULT_HOST = "127.0.0.1"  # loopback: reachable from this machine only
DEFAULT_PORT = 8080
MAX_BATCH = 1024  # queries (or items) per request
MAX_BODY_BYTES = 8 << 20  # request body size limit
WARMUP_BATCHES = (1, 2, 4, 8)  # batch sizes compiled before the first request (with the default k)
OPTIONS = ("k", "method", "backend", "exclude", "allow")  # the fields both endpoints take
ENDPOINTS = "GET /health, POST /search, POST /similar"
log = logging.getLogger("sslrec.serve")


class RequestError(ServingError):
  """A request that cannot be answered (HTTP 400)."""


def _need_extra():
  if _MISSING is not None:
    raise ServingError(
      f"sslrec-serve needs the optional 'serve' extra ({_MISSING.name or _MISSING} is not "
      "installed): pip install 'sslrec[serve]'"
    )


def _results_json(res: Results) -> list[dict]:
  out = []
  for i in range(res.rows.shape[0]):
    r = {"keys": res.keys[i].tolist(), "scores": [round(float(s), 6) for s in res.scores[i]]}
    if res.names is not None:
      r["names"] = res.names[i].tolist()
    out.append(r)
  return out


def _batch(body: dict, many: str, one: str, limit: int) -> list:
  """The request's batch: ``body[many]`` (a non-empty list) or ``[body[one]]``; RequestError."""
  given = [f for f in (many, one) if f in body]
  if len(given) != 1:
    raise RequestError(
      f"give exactly one of the fields {many!r} (a list) or {one!r}"
      + (" (got both)" if given else "")
    )
  if one in body:
    return [body[one]]
  batch = body[many]
  if not isinstance(batch, list) or not batch:
    raise RequestError(f"field {many!r} must be a non-empty list")
  if len(batch) > limit:
    raise RequestError(f"field {many!r} has {len(batch)} entries; at most {limit} per request")
  return batch


class Service:
  """What the endpoints compute: parses a request body (a dict) and answers it with a Retriever."""

  def __init__(
    self,
    retriever: Retriever,
    *,
    method: str = "exact",
    default_k: int = 10,
    max_batch: int = MAX_BATCH,
  ):
    self.retriever = retriever
    self.method = method
    self.default_k = default_k
    self.max_batch = max_batch

  def _options(self, body: dict, fields: Sequence[str]) -> dict:
    unknown = sorted(set(body) - set(fields) - set(OPTIONS))
    if unknown:
      raise RequestError(
        f"unknown fields: {', '.join(map(repr, unknown))}; allowed: "
        f"{', '.join(list(fields) + list(OPTIONS))}"
      )
    k = body.get("k", self.default_k)
    if isinstance(k, bool) or not isinstance(k, int):
      raise RequestError(f"field 'k' must be an integer >= 1, got {k!r}")
    method = body.get("method", self.method)
    if method not in ("exact", "ann"):
      raise RequestError(f"field 'method' must be 'exact' or 'ann', got {method!r}")
    backend = body.get("backend", "auto")
    if backend != "auto" and backend not in ann.BACKENDS:
      raise RequestError(f"field 'backend' must be one of auto, {', '.join(ann.BACKENDS)}")
    return dict(
      k=k, method=method, backend=backend, exclude=body.get("exclude"), allow=body.get("allow")
    )

  def _answer(self, res: Results) -> dict:
    return {
      "results": _results_json(res),
      "method": res.method,
      "notes": res.notes,
      "step": self.retriever.step,
    }

  def search(self, body: dict) -> dict:
    queries = _batch(body, "queries", "query", self.max_batch)
    kw = self._options(body, ("queries", "query"))
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", ServingWarning)  # also in the notes
      return self._answer(self.retriever.search(queries, **kw))

  def similar(self, body: dict) -> dict:
    items = _batch(body, "items", "item", self.max_batch)
    kw = self._options(body, ("items", "item"))
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", ServingWarning)
      return self._answer(self.retriever.similar_items(items, **kw))

  def health(self) -> dict:
    r = self.retriever
    return {
      "status": "ok",
      "step": r.step,
      "num_items": r.num_items,
      "dim": r.dim,
      "method": self.method,
    }

  def warm_up(self, batches: Sequence[int] = WARMUP_BATCHES):
    """Compiles the query tower and the search for these batch sizes (the first request of a new
    batch-size bucket is otherwise slower)."""
    for b in batches:
      self.search({"queries": [{}] * b})


def _error(status: int, message: str) -> JSONResponse:
  return JSONResponse({"error": message}, status_code=status)


def create_app(service: Service, *, max_body_bytes: int = MAX_BODY_BYTES) -> Starlette:
  """The Starlette app of ``service`` (routes and JSON errors as the module docstring says)."""
  _need_extra()

  async def read_json(request: Request) -> dict:
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > max_body_bytes:
      raise HTTPException(413, f"request body of {length} bytes; at most {max_body_bytes}")
    raw = await request.body()
    if len(raw) > max_body_bytes:
      raise HTTPException(413, f"request body of {len(raw)} bytes; at most {max_body_bytes}")
    try:
      body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
      raise RequestError(f"the request body is not valid JSON ({e})") from None
    if not isinstance(body, dict):
      raise RequestError(f"the request body must be a JSON object, got {type(body).__name__}")
    return body

  def endpoint(compute):
    async def handle(request: Request) -> JSONResponse:
      body = await read_json(request)
      return JSONResponse(await run_in_threadpool(compute, body))

    return handle

  async def health(request: Request) -> JSONResponse:
    return JSONResponse(service.health())

  async def serving_error(request: Request, exc: ServingError) -> JSONResponse:
    return _error(400, " ".join(str(exc).split()))

  async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
    detail = str(exc.detail)
    if exc.status_code in (404, 405):
      detail = f"{request.method} {request.url.path}: {detail.lower()}; endpoints: {ENDPOINTS}"
    return _error(exc.status_code, detail)

  async def internal_error(request: Request, exc: Exception) -> JSONResponse:
    log.exception("internal error answering %s %s", request.method, request.url.path)
    return _error(500, f"internal error ({type(exc).__name__}); see the server's log")

  return Starlette(
    routes=[
      Route("/health", health, methods=["GET"]),
      Route("/search", endpoint(service.search), methods=["POST"]),
      Route("/similar", endpoint(service.similar), methods=["POST"]),
    ],
    exception_handlers={
      ServingError: serving_error,
      HTTPException: http_error,
      Exception: internal_error,
    },
  )


class _Parser(argparse.ArgumentParser):
  def error(self, message):  # one line and exit code 2, as every sslrec command
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def _parser() -> argparse.ArgumentParser:
  p = _Parser(
    prog="sslrec-serve", description="Serve an sslrec export over HTTP (docs/serving.md)."
  )
  p.add_argument("--export", required=True, help="export directory written by sslrec-export")
  p.add_argument("--host", default=DEFAULT_HOST, help="address to bind (default: loopback only)")
  p.add_argument("--port", type=int, default=DEFAULT_PORT, help="port (0: any free one)")
  p.add_argument("--method", choices=("exact", "ann"), default="exact", help="default search")
  p.add_argument("--k", type=int, default=10, help="items per query when a request gives no k")
  p.add_argument("--max_batch", type=int, default=MAX_BATCH, help="queries per request at most")
  p.add_argument("--max_body_bytes", type=int, default=MAX_BODY_BYTES, help="request size limit")
  p.add_argument("--no_verify", action="store_true", help="skip the sha256 check of the export")
  p.add_argument("--no_warmup", action="store_true", help="do not compile before serving")
  p.add_argument("--log_level", default="warning", help="uvicorn's log level")
  return p


def _bind(host: str, port: int) -> socket.socket:
  family = socket.AF_INET6 if ":" in host else socket.AF_INET
  sock = socket.socket(family, socket.SOCK_STREAM)
  sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
  try:
    sock.bind((host, port))
  except OSError as e:
    sock.close()
    raise ServingError(f"--host={host} --port={port}: cannot bind ({e.strerror or e})") from None
  sock.listen(2048)
  sock.set_inheritable(True)
  return sock


def main(argv: Sequence[str] | None = None):
  """The ``sslrec-serve`` command."""
  args = _parser().parse_args(argv)
  try:
    _need_extra()
    for name in ("port", "k", "max_batch", "max_body_bytes"):
      value = getattr(args, name)
      if value < (0 if name == "port" else 1) or (name == "port" and value > 65535):
        raise ServingError(f"--{name}={value} is out of range")
    retriever = Retriever.load(args.export, verify=not args.no_verify)
    service = Service(retriever, method=args.method, default_k=args.k, max_batch=args.max_batch)
    if not args.no_warmup:
      service.warm_up()
    sock = _bind(args.host, args.port)
  except ServingError as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(2)
  host, port = sock.getsockname()[:2]
  shown = f"[{host}]" if ":" in host else host
  print(
    f"serving {args.export} (step {retriever.step}, {retriever.num_items} items, "
    f"{args.method} search) on http://{shown}:{port}",
    flush=True,
  )
  if host not in ("127.0.0.1", "::1", "localhost"):
    print(f"note: --host={args.host} accepts connections from other machines", flush=True)
  app = create_app(service, max_body_bytes=args.max_body_bytes)
  config = uvicorn.Config(app, log_level=args.log_level, access_log=False)
  uvicorn.Server(config).run(sockets=[sock])


if __name__ == "__main__":
  main()
