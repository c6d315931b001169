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
- ``csv`` / ``tsv``: a header line names the columns; types are inferred, or
  given with ``--schema name:type,...`` (types: int64, float32, float64,
  string, bool).
- ``parquet``: the file's own schema.

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


def _csv_batches(path: str, layout: str, header: bool, label: bool, schema: dict | None) -> Iterator[pa.RecordBatch]:
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
        types = schema
    else:
        raise ConvertError(f"unknown layout {layout!r}")
    read = pcsv.ReadOptions(column_names=names, autogenerate_column_names=False, block_size=1 << 24)
    if header and names is not None:
        read = pcsv.ReadOptions(column_names=names, skip_rows=1, block_size=1 << 24)
    parse = pcsv.ParseOptions(delimiter=delimiter)
    convert = pcsv.ConvertOptions(column_types=types, strings_can_be_null=True, null_values=[""])
    try:
        reader = pcsv.open_csv(path, read_options=read, parse_options=parse, convert_options=convert)
        yield from reader
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        raise ConvertError(f"{path}: {e}") from None


def _batches(path: str, layout: str, header: bool, label: bool, schema: dict | None) -> Iterator[pa.RecordBatch]:
    if not os.path.isfile(path):
        raise ConvertError(f"{path}: no such file")
    if layout == "parquet":
        import pyarrow.parquet as pq

        try:
            yield from pq.ParquetFile(path).iter_batches(batch_size=1 << 16)
        except (pa.ArrowInvalid, OSError) as e:
            raise ConvertError(f"{path}: {e}") from None
    else:
        yield from _csv_batches(path, layout, header, label, schema)


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
) -> list[str]:
    """Converts ``inputs`` (in order) to ORC files in ``output_dir``; returns
    their paths."""
    if rows_per_file < 1:
        raise ConvertError(f"rows_per_file must be >= 1, got {rows_per_file}")
    if rows_per_stripe < 1:
        raise ConvertError(f"rows_per_stripe must be >= 1, got {rows_per_stripe}")
    types = parse_schema(schema) if schema else None
    os.makedirs(output_dir, exist_ok=True)
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

    for path in inputs:
        for batch in _batches(path, layout, header, label, types):
            if first_schema is None:
                first_schema = batch.schema
            elif batch.schema != first_schema:
                raise ConvertError(f"{path}: its columns {batch.schema.names} differ from the first input's")
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
