"""recis convert: CSV/TSV/Parquet to ORC, checked against pyarrow's reading."""

import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.orc as po
import pyarrow.parquet as pq
import pytest

from recis.cli import main
from recis.io import Column, OrcDataset
from recis.io.convert import ConvertError, convert

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def criteo_lines(n):
    lines = []
    for i in range(n):
        ints = [str(i * k) if (i + k) % 5 else "" for k in range(13)]
        cats = [f"{(i * 2654435761 + k) % 2**32:08x}" if (i + k) % 7 else "" for k in range(26)]
        lines.append("\t".join([str(i % 2), *ints, *cats]))
    return lines


def test_criteo_layout_splits_into_files_of_the_chosen_size(tmp_path):
    src = tmp_path / "train.txt"
    src.write_text("\n".join(criteo_lines(250)) + "\n")
    files = convert([str(src)], str(tmp_path / "out"), "criteo", rows_per_file=100)
    assert [os.path.basename(f) for f in files] == ["part-00000.orc", "part-00001.orc", "part-00002.orc"]
    t = pa.concat_tables([po.read_table(f) for f in files])
    assert t.num_rows == 250 and t.column_names[:3] == ["label", "I1", "I2"]
    # I1 of row i is i * 0, empty (null) when i % 5 == 0.
    assert t["I1"].to_pylist() == [None if i % 5 == 0 else 0 for i in range(250)]
    row7 = criteo_lines(250)[7].split("\t")
    assert t["C3"][7].as_py() == (row7[1 + 13 + 2] or None)
    assert t["I4"][7].as_py() == (int(row7[4]) if row7[4] else None)
    ds = OrcDataset(str(tmp_path / "out"), 64, ["label", "I1", Column("C1", hash=True)])
    assert sum(b["label"].numel() for b in ds) == 250


def stripe_rows(path):
    f = po.ORCFile(path)
    return [f.read_stripe(i).num_rows for i in range(f.nstripes)]


def test_rows_per_stripe(tmp_path):
    src = tmp_path / "train.txt"
    src.write_text("\n".join(criteo_lines(30000)) + "\n")
    files = convert([str(src)], str(tmp_path / "z"), "criteo", rows_per_file=25000, rows_per_stripe=12000)
    assert [stripe_rows(f) for f in files] == [[12000, 12000, 1000], [5000]]
    # Exact at any size uncompressed; through the command line.
    out = tmp_path / "u"
    args = ["convert", "--format", "criteo", str(src), "-o", str(out), "--rows-per-file", "250"]
    assert main([*args, "--rows-per-stripe", "100", "--compression", "uncompressed"]) == 0
    files = sorted(out.glob("*.orc"))
    assert len(files) == 120 and stripe_rows(files[0]) == [100, 100, 50]
    # The default: 65536 rows a stripe (of rows that do not compress to
    # nothing: see recis.io.convert).
    x = np.random.default_rng(0).integers(0, 2**62, 70000)
    pq.write_table(pa.table({"x": pa.array(x, pa.int64())}), tmp_path / "x.parquet")
    files = convert([str(tmp_path / "x.parquet")], str(tmp_path / "d"), "parquet")
    assert stripe_rows(files[0]) == [65536, 4464]
    ds = OrcDataset(str(tmp_path / "z"), 4096, ["label", "I2"], shuffle=True, shuffle_buffer=15000)
    assert sum(b["label"].numel() for b in ds) == 30000
    with pytest.raises(ConvertError, match="rows_per_stripe must be >= 1, got 0"):
        convert([str(src)], str(tmp_path / "o"), "criteo", rows_per_stripe=0)


def test_avazu_layout_with_and_without_header(tmp_path):
    header = ",".join(
        ["id", "click", "hour", "C1", "banner_pos", "site_id", "site_domain", "site_category", "app_id"]
        + ["app_domain", "app_category", "device_id", "device_ip", "device_model", "device_type"]
        + ["device_conn_type"]
        + [f"C{i}" for i in range(14, 22)]
    )
    row = "10000174058809263569,0,14102100,1005,0,1fbe01fe,f3845767,28905ebd,ecad2386,7801e8d9,07d7df22,a99f214a,"
    row += "8a4875bd,be6db1d7,1,0,15706,320,50,1722,0,35,-1,79"
    (tmp_path / "a.csv").write_text(header + "\n" + row + "\n")
    (tmp_path / "b.csv").write_text(row + "\n")
    out = convert([str(tmp_path / "a.csv")], str(tmp_path / "oa"), "avazu")
    t = po.read_table(out[0])
    assert t["id"][0].as_py() == "10000174058809263569" and t["C20"][0].as_py() == -1
    out = convert([str(tmp_path / "b.csv")], str(tmp_path / "ob"), "avazu", header=False)
    assert po.read_table(out[0]).equals(t)


def test_parquet_and_general_csv(tmp_path):
    table = pa.table({"user": ["a", "b", None], "price": [1.5, None, 3.0], "n": [1, 2, 3]})
    pq.write_table(table, tmp_path / "x.parquet")
    out = convert([str(tmp_path / "x.parquet")], str(tmp_path / "p"), "parquet")
    assert po.read_table(out[0]).equals(table)
    (tmp_path / "y.csv").write_text("user,price,n\na,1.5,1\nb,,2\n")
    out = convert([str(tmp_path / "y.csv")], str(tmp_path / "c"), "csv", schema="user:string,price:float32,n:int64")
    t = po.read_table(out[0])
    assert t.schema.field("price").type == pa.float32() and t["price"].to_pylist() == [1.5, None]


def test_bad_inputs_name_the_file(tmp_path):
    with pytest.raises(ConvertError, match="missing.csv: no such file"):
        convert([str(tmp_path / "missing.csv")], str(tmp_path / "o"), "csv")
    bad = tmp_path / "bad.txt"
    bad.write_text("1\t2\t3\n")  # 3 columns, criteo needs 40
    with pytest.raises(ConvertError, match="bad.txt"):
        convert([str(bad)], str(tmp_path / "o"), "criteo")
    with pytest.raises(ConvertError, match="must be name:type"):
        convert([str(bad)], str(tmp_path / "o"), "csv", schema="x:decimal")
    assert main(["convert", str(tmp_path / "missing.csv"), "-o", str(tmp_path / "o"), "--format", "csv"]) == 1


@pytest.mark.skipif(not (SHARED / "criteo").is_dir(), reason="../shared/data (real Criteo/Avazu slices) not present")
def test_real_criteo_and_avazu_slices_convert_and_read_back(tmp_path):
    files = convert([str(SHARED / "criteo" / "criteo_kaggle_head_train.txt")], str(tmp_path / "criteo"), "criteo")
    t = po.read_table(files[0])
    assert t.num_rows == 900 and abs(pc.mean(t["label"]).as_py() - 0.196) < 0.01
    files = convert([str(SHARED / "avazu" / "avazu_train.csv")], str(tmp_path / "avazu"), "avazu")
    t = po.read_table(files[0])
    assert t.num_rows == 8087 and abs(pc.mean(t["click"]).as_py() - 0.173) < 0.01
    dev = convert([str(SHARED / "avazu" / "avazu_dev.csv")], str(tmp_path / "dev"), "avazu", header=False)
    assert po.read_table(dev[0]).num_rows == 480
    ds = OrcDataset(str(tmp_path / "avazu"), 1000, ["click", Column("site_id", hash=True)])
    assert sum(b["click"].numel() for b in ds) == 8087


def test_csv_list_columns_read_back_through_the_reader(tmp_path):
    from recis.io import OrcDataset

    (tmp_path / "l.csv").write_text("label,genres,scores\n1,3|7|9,0.5|1.5\n0,,\n1,4,2.0\n")
    out = convert(
        [str(tmp_path / "l.csv")],
        str(tmp_path / "o"),
        "csv",
        schema="label:int64,genres:list<int64>,scores:list<float32>",
    )
    t = po.read_table(out[0])
    assert t.schema.field("genres").type == pa.list_(pa.int64())
    assert t["genres"].to_pylist() == [[3, 7, 9], [], [4]]
    assert t["scores"].to_pylist() == [[0.5, 1.5], [], [2.0]]
    batch = next(iter(OrcDataset(out, 8, ["genres"], shuffle=False)))
    assert batch["genres"].values.tolist() == [3, 7, 9, 4] and batch["genres"].offsets.tolist() == [0, 3, 3, 4]
    (tmp_path / "b.csv").write_text("genres\n3;x\n")
    with pytest.raises(ConvertError, match=r"b.csv: column 'genres': not a list<item: int64>"):
        convert([str(tmp_path / "b.csv")], str(tmp_path / "o2"), "csv", schema="genres:list<int64>", list_delimiter=";")
    with pytest.raises(ConvertError, match="the file's own delimiter"):
        convert([str(tmp_path / "b.csv")], str(tmp_path / "o3"), "csv", schema="genres:list<int64>", list_delimiter=",")


def test_the_schema_is_fixed_by_the_first_file_and_a_mismatch_writes_nothing(tmp_path):
    (tmp_path / "a.csv").write_text("title,release_year\nx,1999\ny,2001\n")
    (tmp_path / "b.csv").write_text("title,release_year\nz,unknown\n")
    (tmp_path / "c.csv").write_text("title,year\nz,2000\n")
    out_dir = tmp_path / "o"
    with pytest.raises(ConvertError, match=r"b.csv: .*release_year"):
        convert([str(tmp_path / "a.csv"), str(tmp_path / "b.csv")], str(out_dir), "csv", rows_per_file=1)
    assert list(out_dir.iterdir()) == []  # a.csv's files were not left behind
    with pytest.raises(ConvertError, match=r"c.csv: its columns differ from .*a.csv's \(missing \['release_year'\]"):
        convert([str(tmp_path / "a.csv"), str(tmp_path / "c.csv")], str(out_dir), "csv")
    # A later file whose years parse under the first's int64 converts.
    (tmp_path / "d.csv").write_text("title,release_year\nw,\n")
    out = convert([str(tmp_path / "a.csv"), str(tmp_path / "d.csv")], str(out_dir), "csv")
    assert po.read_table(out[0])["release_year"].to_pylist() == [1999, 2001, None]
    # A directory that holds part files is refused, then replaced with overwrite.
    with pytest.raises(ConvertError, match=r"already holds 1 part-\*.orc file"):
        convert([str(tmp_path / "a.csv")], str(out_dir), "csv")
    out = convert([str(tmp_path / "a.csv")], str(out_dir), "csv", overwrite=True, rows_per_file=1)
    assert sorted(p.name for p in out_dir.iterdir()) == ["part-00000.orc", "part-00001.orc"]
