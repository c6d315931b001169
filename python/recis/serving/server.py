"""`recis serve`: an HTTP scoring endpoint over a `Predictor`.

A WSGI application (``ScoringApp``) served by waitress, a multi-threaded
production WSGI server:

- ``POST /predict`` with a JSON body ``{"rows": [{column: value, ...}, ...]}``
  — each row holds the export's input columns as the ORC files did: a
  feature's ids (an int, or a list of ints, for a list column), or its
  strings when the feature hashes them (a str or a list of str), and each
  dense column's number (``null`` reads as a null does in a file). The
  reply is ``{"scores": [...], "generation": G}``: click probabilities, in
  row order, from one generation of the model. A multi-task model's reply
  adds ``"task_scores": {task: [...]}`` (``Predictor.tasks``), and
  ``"scores"`` is the first task's.
- ``GET /healthz``: ``{"status": "ok", "generation": G, "step": S}``.
- Served from a lineage directory, the predictor applies new deltas as
  they appear (``Refresher``, every ``poll_seconds``): a request is scored
  by one generation, which its reply names.
- ``GET /metadata``: the columns a row needs, and the model's features.

A malformed request gets status 400 and ``{"error": ...}`` naming the row,
the column and what is wrong (an unknown or missing column, a wrong type);
a body beyond ``max_body_bytes`` 413; more rows than ``max_rows`` 413.
Nothing a request holds changes the model: lookups insert nothing.
"""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import torch

from recis.features.ops import Hash
from recis.features.strings import StringColumn
from recis.ragged import RaggedTensor

INT64 = (-(2**63), 2**63 - 1)


class RequestError(ValueError):
    """A request that cannot be scored: the message says why (status 400)."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def _ids(rows: list[dict], column: str) -> RaggedTensor:
    plain = [row[column] for row in rows]
    if all(type(v) is list for v in plain):
        flat, lengths = list(itertools.chain.from_iterable(plain)), list(map(len, plain))
    else:
        flat, lengths = plain, None
    if all(type(x) is int for x in flat):
        try:
            values = torch.from_numpy(np.array(flat, dtype=np.int64))
        except OverflowError:
            values = None
        if values is not None:
            if lengths is None:
                return RaggedTensor(values, torch.arange(len(rows) + 1), validate=False)
            offsets = torch.zeros(len(rows) + 1, dtype=torch.int64)
            offsets[1:] = torch.cumsum(torch.tensor(lengths, dtype=torch.int64), 0)
            return RaggedTensor(values, offsets, validate=False)
    # Something is wrong: name the first row and value at fault.
    for r, v in enumerate(plain):
        for x in v if isinstance(v, list) else [v]:
            if type(x) is not int or not INT64[0] <= x <= INT64[1]:
                raise RequestError(f"row {r}: column {column!r}: ids must be int64 integers, got {x!r}")
    raise RequestError(f"column {column!r}: a column holds either an id a row or a list of ids a row")


def _strings(rows: list[dict], column: str, bucket: int):
    listed = any(isinstance(row[column], list) for row in rows)
    col = []
    for r, row in enumerate(rows):
        v = row[column]
        items = v if isinstance(v, list) else [v]
        if not all(isinstance(x, str) for x in items):
            raise RequestError(f"row {r}: column {column!r}: the feature hashes strings, got {v!r}")
        col.append(items if listed else v)
    (out,) = Hash.run_many([Hash(bucket)], [StringColumn.from_list(col)], [column])
    return out


def _any(rows: list[dict], column: str, hash_strings: bool):
    """An op chain's input column: strings (hashed with ``hash_strings``,
    as the reader does), numbers (any float, or a null: as a float column),
    else ids (one or a list a row)."""
    plain = [row[column] for row in rows]
    items = [x for v in plain for x in (v if isinstance(v, list) else [v])]
    if items and all(isinstance(x, str) for x in items):
        if hash_strings:
            return _strings(rows, column, 0)
        return StringColumn.from_list(plain)
    if any(type(x) is float or x is None for x in items) and not any(isinstance(v, list) for v in plain):
        return _numbers(rows, column).to(torch.float32)
    ids = _ids(rows, column)
    if not any(isinstance(v, list) for v in plain):
        return ids.values  # one id a row: a [B] column, as the reader gives it
    return ids


def _numbers(rows: list[dict], column: str) -> torch.Tensor:
    plain = [row[column] for row in rows]
    if all(type(v) is float or type(v) is int for v in plain):
        return torch.from_numpy(np.array(plain, dtype=np.float64))
    out = np.empty(len(rows), dtype=np.float64)
    for r, row in enumerate(rows):
        v = row[column]
        if v is None:
            out[r] = math.nan
        elif isinstance(v, bool) or not isinstance(v, (int, float)):
            raise RequestError(f"row {r}: column {column!r}: expected a number or null, got {v!r}")
        else:
            out[r] = float(v)
    return torch.from_numpy(out)


def request_batch(pipeline, rows) -> dict:
    """A reader-like batch of the request's ``rows`` (see the module
    docstring), or a RequestError naming what is wrong."""
    if not isinstance(rows, list) or not rows:
        raise RequestError('expected {"rows": [ {column: value, ...}, ... ]} with at least one row')
    features = {}
    for f in pipeline.features:
        for c in f.inputs():
            features.setdefault(c, f)
    wanted = list(features) + [c for c in pipeline.dense if c not in features]
    wanted += [c for c, _ in pipeline.vectors if c not in wanted]
    known = set(wanted) | {pipeline.label, pipeline.group, *(pipeline.labels or ())} - {None}
    for r, row in enumerate(rows):
        if not isinstance(row, dict):
            raise RequestError(f"row {r}: expected an object of columns, got {type(row).__name__}")
        missing = [c for c in wanted if c not in row]
        if missing:
            raise RequestError(f"row {r}: missing columns {missing} (a row needs {wanted})")
        unknown = sorted(set(row) - known)
        if unknown:
            raise RequestError(f"row {r}: unknown columns {unknown} (the model reads {wanted})")
    batch = {}
    for column, f in features.items():
        if f.ops:
            batch[column] = _any(rows, column, f.hash)  # what the op chain reads: ids, numbers or strings
        else:
            batch[column] = _strings(rows, column, f.bucket) if f.hash else _ids(rows, column)
    for column in pipeline.dense:
        if column not in batch:
            batch[column] = _numbers(rows, column)
    for column, k in pipeline.vectors:
        batch[column] = _vectors(rows, column, k)
    return batch


def _vectors(rows: list[dict], column: str, k: int) -> torch.Tensor:
    """A vector column: k numbers a row, as a [B, k] tensor."""
    try:
        out = np.array([row[column] for row in rows], dtype=np.float32)
    except (TypeError, ValueError):
        out = None
    if out is None or out.ndim != 2 or out.shape[1] != k:
        for r, row in enumerate(rows):
            v = row[column]
            if (
                not isinstance(v, list)
                or len(v) != k
                or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)
            ):
                raise RequestError(f"row {r}: column {column!r}: expected a list of {k} numbers, got {v!r}")
        raise RequestError(f"column {column!r}: expected a list of {k} numbers a row")
    return torch.from_numpy(out)


class ScoringApp:
    """The WSGI application. ``predictor``: a ``Predictor`` (its current
    generation is read once a request, so a swap is seen whole)."""

    def __init__(self, predictor, max_body_bytes: int = 16 << 20, max_rows: int = 65536):
        if predictor.pipeline is None:
            raise ValueError(f"{predictor.directory}: the export has no input pipeline, so rows cannot be scored")
        self.predictor = predictor
        self.max_body_bytes = max_body_bytes
        self.max_rows = max_rows

    def __call__(self, environ, start_response):
        try:
            status, body = self._route(environ)
        except RequestError as e:
            status, body = e.status, {"error": str(e)}
        text = json.dumps(body).encode()
        reason = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed", 413: "Too Large"}
        start_response(
            f"{status} {reason.get(status, 'Error')}",
            [("Content-Type", "application/json"), ("Content-Length", str(len(text)))],
        )
        return [text]

    def _route(self, environ) -> tuple[int, dict]:
        path, method = environ.get("PATH_INFO", ""), environ.get("REQUEST_METHOD", "")
        p = self.predictor
        if path == "/healthz":
            return 200, {"status": "ok", "generation": p.generation, "step": p.step}
        if path == "/metadata":
            pipe = p.pipeline
            return 200, {
                "generation": p.generation,
                "columns": [f.column for f in pipe.features] + list(pipe.dense),
                "hashed": [f.column for f in pipe.features if f.hash],
                "features": p.meta["features"],
            }
        if path != "/predict":
            raise RequestError(f"no such endpoint {path!r} (POST /predict, GET /healthz, GET /metadata)", 404)
        if method != "POST":
            raise RequestError("POST a JSON body to /predict", 405)
        try:
            length = int(environ.get("CONTENT_LENGTH") or 0)
        except ValueError:
            raise RequestError("Content-Length is not a number") from None
        if length > self.max_body_bytes:
            raise RequestError(f"body of {length} bytes is beyond the limit of {self.max_body_bytes}", 413)
        raw = environ["wsgi.input"].read(length)
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise RequestError(f"body is not valid JSON ({e})") from None
        if not isinstance(body, dict) or "rows" not in body:
            raise RequestError('expected {"rows": [ {column: value, ...}, ... ]}')
        rows = body["rows"]
        if isinstance(rows, list) and len(rows) > self.max_rows:
            raise RequestError(f"{len(rows)} rows is beyond the limit of {self.max_rows} a request", 413)
        batch = request_batch(p.pipeline, rows)
        try:
            inputs = p.pipeline(batch)
        except ValueError as e:  # a dense value beyond float32, with non_finite = "error"
            raise RequestError(str(e)) from None
        scores, generation = p.predict_generation(inputs)
        if scores.dim() == 1:
            return 200, {"scores": scores.tolist(), "generation": generation}
        tasks = p.tasks
        return 200, {
            "scores": scores[:, 0].tolist(),
            "task_scores": {t: scores[:, i].tolist() for i, t in enumerate(tasks)},
            "generation": generation,
        }


def serve(predictor, host: str = "127.0.0.1", port: int = 8080, threads: int = 4, **app_kwargs):
    """Serves ``predictor`` until interrupted (waitress)."""
    from waitress import serve as waitress_serve

    waitress_serve(ScoringApp(predictor, **app_kwargs), host=host, port=port, threads=threads, ident="recis")


def make_server(predictor, host: str = "127.0.0.1", port: int = 0, threads: int = 4, **app_kwargs):
    """A waitress server bound to (host, port) — port 0: any free one, read
    it back from ``server.effective_port`` — not yet running: call
    ``server.run()`` (in a thread, for tests) and ``server.close()``."""
    from waitress.server import create_server

    return create_server(ScoringApp(predictor, **app_kwargs), host=host, port=port, threads=threads, ident="recis")


class Refresher:
    """Applies a lineage's new deltas every ``poll_seconds`` in a daemon
    thread (``Predictor.refresh``). A delta that does not apply is reported
    (``errors``, and on stderr once) and the predictor keeps serving its
    last good generation; it is retried at each poll."""

    def __init__(self, predictor, poll_seconds: float = 10.0, log=None):
        import sys
        import threading

        self.predictor, self.poll_seconds = predictor, poll_seconds
        self.errors: list[str] = []
        self._log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="recis-refresh", daemon=True)

    def start(self) -> Refresher:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        from recis.serving.export import ExportError

        while not self._stop.wait(self.poll_seconds):
            try:
                for gen in self.predictor.refresh():
                    self._log(f"recis serve: now serving generation {gen}")
            except ExportError as e:
                if not self.errors or self.errors[-1] != str(e):
                    self._log(f"recis serve: kept generation {self.predictor.generation}: {e}")
                self.errors.append(str(e))


def shutdown(server, thread=None, timeout: float = 10.0) -> None:
    """Stops a ``make_server`` server running in ``thread``: its loop closes
    every connection and the listening socket (from inside the loop, so no
    select sees a closed descriptor), then its request threads end."""
    from waitress import wasyncore

    server.trigger.pull_trigger(lambda: wasyncore.close_all(server._map, ignore_all=True))
    if thread is not None:
        thread.join(timeout)
    server.task_dispatcher.shutdown()
