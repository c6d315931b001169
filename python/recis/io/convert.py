"""`recis convert`: CSV/TSV (Criteo and Avazu layouts, or any schema) and
Parquet to ORC files of a chosen number of rows, streamed (the input is never
held in memory whole).

Layouts:
- ``criteo``: tab-separated, no header: ``label``, ``I1..I13`` (integers,
  empty = null), ``C1..C26`` (hashed categories as strings, empty = null).
  Test files without a label: ``--no-label``.
- ``avazu``: comma-separated with a header (or, with ``--no-header``, the
  header-less dev/test files): ``id`` as a string (it overflows int64),
  ``click``, ``hour``, ``C1``, ``banner_pos``, ``device_type``,
  ``device_conn_type`` and ``C14..C21`` as int64, the rest as strings.
- ``csv`` / ``tsv``: a header line names the columns; types are given with
  ``--schema name:type,...`` (types: int64, float32, float64, string, bool,
  and ``list<T>`` of any of these but bool: a field of values joined by
  ``--list-delimiter``, default ``|``; an empty field is an empty list), or
  inferred from the first file for the columns ``--schema`` leaves out.
- ``parquet``: the file's own schema.

The schema is fixed once, from ``--schema`` and the first input file:
every later file is parsed with the first's column types, and one whose
columns differ, or whose values do not fit a column's type (a year that
was an integer in the first file and is a string here), is a
``ConvertError`` naming the file, the column and both types, before
anything is written where training would read it.

Files are written into a temporary directory inside the output directory
and moved into place when every input has converted: a failed conversion
leaves the output directory as it was. An output directory that already
holds ``part-*.orc`` files is refused (their rows would mix with the new
ones in a directory the reader globs), unless ``overwrite`` (``--overwrite``)
replaces them.

Output files are ``part-00000.orc``, ``part-00001.orc``, … in the output
directory, each written under a temporary name and renamed when complete.

Stripes (the units ``OrcDataset`` shuffles, shards across workers and
decodes in parallel) hold about ``rows_per_stripe`` rows
(``--rows-per-stripe``, default 65536), a file's last stripe the rest.
pyarrow's ORC writer cuts stripes by bytes only: it is asked to end a stripe
after every ``rows_per_stripe`` rows it writes (``stripe_size=1``,
``batch_size=rows_per_stripe``), and does so once the stripe's estimated size
is not zero, which for a compressed file means once some column has filled a
64 KiB compression block. So stripes hold exactly ``rows_per_stripe`` rows
when the file is uncompressed, and in practice for ``rows_per_stripe >=
10000`` (an ORC row group) when rows hold a string column or values that do
not compress to almost nothing (Criteo, Avazu, ``recis datagen``); otherwise
a stripe holds a multiple of ``rows_per_stripe`` rows: a few thousand rows
or more for a small ``rows_per_stripe``, the whole file for columns that all
compress to almost nothing.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence

import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.orc as po

CRITEO_INTS = [f"I{i}" for i in range(1, 14)]
CRITEO_CATS = [f"C{i}" for i in range(1, 27)]
AVAZU_COLUMNS = (
    ["id", "click", "hour", "C1", "banner_pos", "site_id", "site_domain", "site_category", "app_id", "app_domain"]
    + ["app_category", "device_id", "device_ip", "device_model", "device_type", "device_conn_type"]
    + [f"C{i}" for i in range(14, 22)]
)
AVAZU_INTS = {"click", "hour", "C1", "banner_pos", "device_type", "device_conn_type"} | {f"C{i}" for i in range(14, 22)}
TYPES = {
    "int64": pa.int64(),
    "float32": pa.float32(),
    "float64": pa.float64(),
    "string": pa.string(),
    "bool": pa.bool_(),
}
TYPES.update({f"list<{k}>": pa.list_(v) for k, v in list(TYPES.items()) if k != "bool"})


class ConvertError(ValueError):
    """A bad input file or option; the message names it."""


def parse_schema(spec: str) -> dict[str, pa.DataType]:
    out = {}
    for part in spec.split(","):
        name, _, ty = part.strip().partition(":")
        if not name or ty not in TYPES:
            raise ConvertError(f"--schema: {part!r} must be name:type with type one of {sorted(TYPES)}")
        out[name] = TYPES[ty]
    return out


def _split_lists(batch: pa.RecordBatch, lists: dict, delimiter: str, path: str) -> pa.RecordBatch:
    """``batch`` with its ``lists`` columns (read as strings) split on
    ``delimiter`` and cast to their list types; a null or empty field is []."""
    import pyarrow.compute as pc

    if not lists:
        return batch
    arrays, fields = [], []
    for name, col in zip(batch.schema.names, batch.columns, strict=True):
        if name in lists:
            filled = pc.fill_null(col, "")
            parts = pc.split_pattern(filled, delimiter)
            # "" splits to [""]: an empty field is an empty list.
            empty = pc.equal(filled, "")
            parts = pc.if_else(empty, pa.scalar([], pa.list_(pa.string())), parts)
            try:
                col = parts.cast(lists[name])
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
                raise ConvertError(f"{path}: column {name!r}: not a {lists[name]} field ({e})") from None
        arrays.append(col)
        fields.append(pa.field(name, col.type))
    return pa.RecordBatch.from_arrays(arrays, schema=pa.schema(fields))


def _csv_batches(
    path: str, layout: str, header: bool, label: bool, schema: dict | None, list_delimiter: str = "|"
) -> Iterator[pa.RecordBatch]:
    names, types, delimiter = None, None, ","
    if layout == "criteo":
        delimiter = "\t"
        names = (["label"] if label else []) + CRITEO_INTS + CRITEO_CATS
        types = {n: pa.int64() for n in names if n == "label" or n.startswith("I")}
        types.update({n: pa.string() for n in CRITEO_CATS})
        header = False
    elif layout == "avazu":
        names = None if header else [c for c in AVAZU_COLUMNS if label or c != "click"]
        types = {n: (pa.int64() if n in AVAZU_INTS else pa.string()) for n in AVAZU_COLUMNS}
    elif layout in ("csv", "tsv"):
        delimiter = "\t" if layout == "tsv" else ","
        types = dict(schema) if schema else None
    else:
        raise ConvertError(f"unknown layout {layout!r}")
    read = pcsv.ReadOptions(column_names=names, autogenerate_column_names=False, block_size=1 << 24)
    if header and names is not None:
        read = pcsv.ReadOptions(column_names=names, skip_rows=1, block_size=1 << 24)
    lists = {n: t for n, t in (types or {}).items() if pa.types.is_list(t)}
    if lists:
        if list_delimiter == delimiter:
            raise ConvertError(f"--list-delimiter {list_delimiter!r} is the file's own delimiter")
        types = {n: (pa.string() if n in lists else t) for n, t in types.items()}
    parse = pcsv.ParseOptions(delimiter=delimiter)
    convert = pcsv.ConvertOptions(column_types=types, strings_can_be_null=True, null_values=[""])
    try:
        reader = pcsv.open_csv(path, read_options=read, parse_options=parse, convert_options=convert)
        for batch in reader:
            yield _split_lists(batch, lists, list_delimiter, path)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        raise ConvertError(f"{path}: {_name_column(str(e), path, names, header, delimiter)}") from None


def _name_column(message: str, path: str, names, header: bool, delimiter: str) -> str:
    """pyarrow's "In CSV column #k: ..." with the column's name."""
    import re

    m = re.match(r"In CSV column #(\d+): (.*)", message, re.S)
    if not m:
        return message
    k, rest = int(m.group(1)), m.group(2)
    if names is None and header:
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                names = f.readline().rstrip("\r\n").split(delimiter)
        except OSError:
            names = None
    if names is None or k >= len(names):
        return message
    return f"column {names[k]!r} (#{k}): {rest} (column types are fixed by --schema or the first file)"


def _batches(
    path: str, layout: str, header: bool, label: bool, schema: dict | None, list_delimiter: str = "|"
) -> Iterator[pa.RecordBatch]:
    if not os.path.isfile(path):
        raise ConvertError(f"{path}: no such file")
    if layout == "parquet":
        import pyarrow.parquet as pq

        try:
            yield from pq.ParquetFile(path).iter_batches(batch_size=1 << 16)
        except (pa.ArrowInvalid, OSError) as e:
            raise ConvertError(f"{path}: {e}") from None
    else:
        yield from _csv_batches(path, layout, header, label, schema, list_delimiter)


def convert(
    inputs: Sequence[str],
    output_dir: str,
    layout: str,
    rows_per_file: int = 1_000_000,
    compression: str = "zstd",
    header: bool = True,
    label: bool = True,
    schema: str | None = None,
    rows_per_stripe: int = 1 << 16,
    list_delimiter: str = "|",
    overwrite: bool = False,
) -> list[str]:
    """Converts ``inputs`` (in order) to ORC files in ``output_dir``; returns
    their paths. See the module docstring for the schema, lists, and what
    a failure leaves."""
    if rows_per_file < 1:
        raise ConvertError(f"rows_per_file must be >= 1, got {rows_per_file}")
    if rows_per_stripe < 1:
        raise ConvertError(f"rows_per_stripe must be >= 1, got {rows_per_stripe}")
    if not list_delimiter:
        raise ConvertError("--list-delimiter must not be empty")
    types = parse_schema(schema) if schema else None
    if types and layout not in ("csv", "tsv"):
        raise ConvertError(f"--schema is for csv/tsv (the {layout} layout fixes its own types)")
    os.makedirs(output_dir, exist_ok=True)
    old = sorted(e for e in os.listdir(output_dir) if e.startswith("part-") and e.endswith(".orc"))
    if old and not overwrite:
        raise ConvertError(
            f"{output_dir} already holds {len(old)} part-*.orc file(s) ({old[0]}, ...): their rows would mix with "
            "the new ones; remove them, choose another --output, or --overwrite to replace them"
        )
    staging = tempfile.mkdtemp(prefix=".convert-", dir=output_dir)
    try:
        done = _convert(
            inputs, staging, layout, rows_per_file, compression, header, label, types, rows_per_stripe, list_delimiter
        )
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    for name in old:
        os.remove(os.path.join(output_dir, name))
    out = []
    for path in done:
        final = os.path.join(output_dir, os.path.basename(path))
        os.replace(path, final)
        out.append(final)
    shutil.rmtree(staging, ignore_errors=True)
    return out


def _schema_mismatch(path: str, got: pa.Schema, want: pa.Schema, origin: str) -> ConvertError:
    if got.names != want.names:
        missing = [n for n in want.names if n not in got.names]
        extra = [n for n in got.names if n not in want.names]
        what = f"missing {missing}" if missing else ""
        what += ("; " if what and extra else "") + (f"extra {extra}" if extra else "")
        return ConvertError(f"{path}: its columns differ from {origin}'s ({what or 'in another order'})")
    for f, g in zip(want, got, strict=True):
        if f.type != g.type:
            return ConvertError(f"{path}: column {f.name!r} is {g.type} here and {f.type} in {origin}")
    return ConvertError(f"{path}: its schema differs from {origin}'s")


def _convert(
    inputs, output_dir, layout, rows_per_file, compression, header, label, types, rows_per_stripe, list_delimiter
) -> list[str]:
    written: list[str] = []
    pending: list[pa.RecordBatch] = []
    pending_rows = 0
    first_schema = None

    def flush(batches: list[pa.RecordBatch]) -> None:
        path = os.path.join(output_dir, f"part-{len(written):05d}.orc")
        tmp = path + ".tmp"
        po.write_table(
            pa.Table.from_batches(batches), tmp, compression=compression, stripe_size=1, batch_size=rows_per_stripe
        )
        os.replace(tmp, path)
        written.append(path)

    origin = None
    for path in inputs:
        for batch in _batches(path, layout, header, label, types, list_delimiter):
            if first_schema is None:
                first_schema, origin = batch.schema, path
                if layout in ("csv", "tsv"):
                    # The first file's types, fixed for every later file.
                    types = {f.name: f.type for f in first_schema}
            elif batch.schema != first_schema:
                raise _schema_mismatch(path, batch.schema, first_schema, origin)
            while batch.num_rows:
                take = min(batch.num_rows, rows_per_file - pending_rows)
                pending.append(batch.slice(0, take))
                pending_rows += take
                batch = batch.slice(take)
                if pending_rows == rows_per_file:
                    flush(pending)
                    pending, pending_rows = [], 0
    if pending_rows:
        flush(pending)
    if not written:
        raise ConvertError(f"no rows in {list(inputs)}")
    return written
