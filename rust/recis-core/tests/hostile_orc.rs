//! Crafted ORC files, each a case from the hostile-input probe: every one
//! ends in a data error naming the file and the reason, never a crash, an
//! abort or an allocation the file did not pay for. The files are written by
//! orc-rust's writer, then their footers, postscripts or streams are edited
//! and re-encoded with the ORC protobuf messages.

use arrow::array::{ArrayRef, Float32Array, Int64Array, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema};
use orc_rust::arrow_writer::ArrowWriterBuilder;
use orc_rust::compression::CompressionType;
use orc_rust::proto::{self, Footer, PostScript, StripeFooter};
use prost::Message;
use recis_core::io::{ColumnRequest, IoError, Limits, Source};
use std::path::{Path, PathBuf};
use std::sync::Arc;

const ROWS: usize = 2000;

fn write(dir: &Path, name: &str, compression: Option<CompressionType>) -> PathBuf {
    let schema = Arc::new(Schema::new(vec![
        Field::new("label", DataType::Int64, false),
        Field::new("dense", DataType::Float32, false),
        Field::new("cat", DataType::Utf8, false),
    ]));
    let cols: Vec<ArrayRef> = vec![
        Arc::new(Int64Array::from_iter_values((0..ROWS as i64).map(|i| i % 7))),
        Arc::new(Float32Array::from_iter_values((0..ROWS).map(|i| i as f32 * 0.5))),
        Arc::new(StringArray::from_iter_values((0..ROWS).map(|i| format!("c{}", i % 13)))),
    ];
    let batch = RecordBatch::try_new(schema.clone(), cols).unwrap();
    let path = dir.join(name);
    let file = std::fs::File::create(&path).unwrap();
    let mut b = ArrowWriterBuilder::new(file, schema);
    if let Some(c) = compression {
        b = b.with_compression(c);
    }
    let mut w = b.try_build().unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();
    path
}

fn columns() -> Vec<ColumnRequest> {
    ["label", "dense"]
        .iter()
        .map(|n| ColumnRequest { name: n.to_string(), hash: false, bucket: 0 })
        .chain(std::iter::once(ColumnRequest { name: "cat".into(), hash: true, bucket: 0 }))
        .collect()
}

/// An uncompressed file's parts: everything before the footer, the footer
/// and the postscript.
fn split(bytes: &[u8]) -> (Vec<u8>, Footer, PostScript) {
    let ps_len = *bytes.last().unwrap() as usize;
    let ps_start = bytes.len() - 1 - ps_len;
    let ps = PostScript::decode(&bytes[ps_start..bytes.len() - 1]).unwrap();
    assert_eq!(ps.compression(), proto::CompressionKind::None);
    let footer_start = ps_start - ps.footer_length() as usize;
    let footer = Footer::decode(&bytes[footer_start..ps_start]).unwrap();
    (bytes[..footer_start].to_vec(), footer, ps)
}

/// The parts put back together; the postscript's footer length follows the
/// footer unless `keep_length` (an edit of the length itself).
fn join(mut head: Vec<u8>, footer: &Footer, mut ps: PostScript, keep_length: bool) -> Vec<u8> {
    let f = footer.encode_to_vec();
    if !keep_length {
        ps.footer_length = Some(f.len() as u64);
    }
    head.extend_from_slice(&f);
    let p = ps.encode_to_vec();
    head.extend_from_slice(&p);
    head.push(p.len() as u8);
    head
}

fn open_err(path: &Path, limits: Limits) -> String {
    match Source::open_with_limits(&[path.to_path_buf()], &columns(), limits) {
        Err(IoError::Data(m)) => m,
        Err(e) => panic!("a usage error for a bad file: {e}"),
        Ok(s) => {
            // The tail may be fine and the stripe not: decode every unit.
            for u in &s.units {
                if let Err(e) = s.decode(u, 0, 512, 512) {
                    return e.to_string();
                }
            }
            panic!("{} read without an error", path.display())
        }
    }
}

fn edited(dir: &Path, name: &str, f: impl FnOnce(&mut Footer, &mut PostScript)) -> PathBuf {
    let good = write(dir, &format!("good-{name}"), None);
    let (head, mut footer, mut ps) = split(&std::fs::read(good).unwrap());
    let length = ps.footer_length;
    f(&mut footer, &mut ps);
    let keep = ps.footer_length != length;
    let path = dir.join(name);
    std::fs::write(&path, join(head, &footer, ps, keep)).unwrap();
    path
}

#[test]
fn the_written_files_read_back() {
    let dir = tempdir();
    for (name, c) in
        [("plain.orc", None), ("zstd.orc", Some(CompressionType::Zstd)), ("zlib.orc", Some(CompressionType::Zlib))]
    {
        let path = write(&dir, name, c);
        let s = Source::open(&[path], &columns()).unwrap();
        let rows: usize =
            s.units.iter().map(|u| s.decode(u, 0, 512, 512).unwrap().iter().map(|c| c.rows).sum::<usize>()).sum();
        assert_eq!(rows, ROWS, "{name}");
    }
}

#[test]
fn a_type_tree_that_refers_back_to_itself_is_refused_before_orc_rust_recurses() {
    let dir = tempdir();
    let path = edited(&dir, "loop.orc", |f, _| {
        f.types[1].kind = Some(proto::r#type::Kind::List as i32);
        f.types[1].subtypes = vec![1];
    });
    let e = open_err(&path, Limits::default());
    assert!(e.contains("loop.orc") && e.contains("type 1 names child 1"), "{e}");
    let path = edited(&dir, "up.orc", |f, _| {
        f.types[2].kind = Some(proto::r#type::Kind::Struct as i32);
        f.types[2].subtypes = vec![0];
        f.types[2].field_names = vec!["x".into()];
    });
    let e = open_err(&path, Limits::default());
    assert!(e.contains("up.orc") && e.contains("names child 0"), "{e}");
}

#[test]
fn a_stripe_claiming_two_to_the_forty_rows_is_refused_before_anything_is_sized_by_it() {
    let dir = tempdir();
    let path = edited(&dir, "rows.orc", |f, _| {
        f.stripes[0].number_of_rows = Some(1 << 40);
        f.number_of_rows = Some(1 << 40);
    });
    let e = open_err(&path, Limits::default());
    assert!(e.contains("rows.orc") && e.contains("claims 1099511627776 rows"), "{e}");
    // Within the row limit but past the stripe's data: the decoders run out
    // of values and say so, after reading only what the streams hold.
    let path = edited(&dir, "more.orc", |f, _| {
        f.stripes[0].number_of_rows = Some(1 << 26);
        f.number_of_rows = Some(1 << 26);
    });
    let t0 = std::time::Instant::now();
    let e = open_err(&path, Limits::default());
    assert!(e.contains("more.orc (stripe 0)") && e.contains("not enough values"), "{e}");
    assert!(t0.elapsed().as_secs() < 30, "{:?}", t0.elapsed());
}

#[test]
fn a_postscript_claiming_a_huge_footer_is_refused() {
    let dir = tempdir();
    let path = edited(&dir, "footer.orc", |_, ps| ps.footer_length = Some(1 << 40));
    let e = open_err(&path, Limits::default());
    assert!(e.contains("footer.orc") && e.contains("claims a footer of 1099511627776 bytes"), "{e}");
    let path = edited(&dir, "meta.orc", |_, ps| ps.metadata_length = Some(u64::MAX - 3));
    let e = open_err(&path, Limits::default());
    assert!(e.contains("meta.orc") && e.contains("metadata of"), "{e}");
    let path = edited(&dir, "block.orc", |_, ps| {
        ps.compression = Some(proto::CompressionKind::Zstd as i32);
        ps.compression_block_size = Some(1 << 40);
    });
    let e = open_err(&path, Limits::default());
    assert!(e.contains("block.orc") && e.contains("block size"), "{e}");
}

#[test]
fn a_stripe_outside_the_file_is_refused() {
    let dir = tempdir();
    let path = edited(&dir, "offset.orc", |f, _| f.stripes[0].data_length = Some(u64::MAX - 10));
    let e = open_err(&path, Limits::default());
    assert!(e.contains("offset.orc") && e.contains("lies outside"), "{e}");
}

/// A zstd file whose stripe's streams are replaced: `replace(k, stream)`
/// gives the new bytes of stream k, or None to keep them. The stripe footer, stripe information
/// and footer are rewritten to match.
fn restreamed(dir: &Path, name: &str, replace: impl Fn(usize, &proto::Stream) -> Option<Vec<u8>>) -> PathBuf {
    rebuilt(dir, name, replace, |_| {})
}

/// As `restreamed`, then `edit` changes the stripe footer before it is
/// written (kinds, encodings).
fn rebuilt(
    dir: &Path,
    name: &str,
    replace: impl Fn(usize, &proto::Stream) -> Option<Vec<u8>>,
    edit: impl Fn(&mut StripeFooter),
) -> PathBuf {
    rebuilt_with(dir, name, replace, edit, Vec::new())
}

/// As `rebuilt`, with `extra` streams (and their bytes) added after the
/// stripe's own.
fn rebuilt_with(
    dir: &Path,
    name: &str,
    replace: impl Fn(usize, &proto::Stream) -> Option<Vec<u8>>,
    edit: impl Fn(&mut StripeFooter),
    extra: Vec<(proto::Stream, Vec<u8>)>,
) -> PathBuf {
    let good = write(dir, &format!("good-{name}"), Some(CompressionType::Zstd));
    let bytes = std::fs::read(good).unwrap();
    let ps_len = *bytes.last().unwrap() as usize;
    let ps_start = bytes.len() - 1 - ps_len;
    let mut ps = PostScript::decode(&bytes[ps_start..bytes.len() - 1]).unwrap();
    let footer_start = ps_start - ps.footer_length() as usize;
    let meta_start = footer_start - ps.metadata_length() as usize;
    let mut footer = Footer::decode(&inflate(&bytes[footer_start..ps_start])[..]).unwrap();
    assert_eq!(footer.stripes.len(), 1);
    let s = footer.stripes[0].clone();
    let sf_at = (s.offset() + s.index_length() + s.data_length()) as usize;
    let mut sf = StripeFooter::decode(&inflate(&bytes[sf_at..sf_at + s.footer_length() as usize])[..]).unwrap();
    let mut out = bytes[..s.offset() as usize].to_vec();
    let mut at = s.offset() as usize;
    let mut index_len = 0u64;
    let mut data_len = 0u64;
    for (k, st) in sf.streams.iter_mut().enumerate() {
        let old = &bytes[at..at + st.length() as usize];
        at += st.length() as usize;
        let new = replace(k, st).unwrap_or_else(|| old.to_vec());
        st.length = Some(new.len() as u64);
        let is_index = matches!(st.kind(), proto::stream::Kind::RowIndex | proto::stream::Kind::BloomFilterUtf8);
        if is_index {
            index_len += new.len() as u64;
        } else {
            data_len += new.len() as u64;
        }
        out.extend_from_slice(&new);
    }
    for (mut st, data) in extra {
        st.length = Some(data.len() as u64);
        data_len += data.len() as u64;
        out.extend_from_slice(&data);
        sf.streams.push(st);
    }
    edit(&mut sf);
    let sf_bytes = compressed(&sf.encode_to_vec());
    out.extend_from_slice(&sf_bytes);
    let info = &mut footer.stripes[0];
    info.index_length = Some(index_len);
    info.data_length = Some(data_len);
    info.footer_length = Some(sf_bytes.len() as u64);
    out.extend_from_slice(&bytes[meta_start..footer_start]);
    let f = compressed(&footer.encode_to_vec());
    out.extend_from_slice(&f);
    ps.footer_length = Some(f.len() as u64);
    let p = ps.encode_to_vec();
    out.extend_from_slice(&p);
    out.push(p.len() as u8);
    let path = dir.join(name);
    std::fs::write(&path, out).unwrap();
    path
}

/// One zstd chunk with its header.
fn chunk(data: &[u8]) -> Vec<u8> {
    let z = zstd_compress(data);
    let mut v = ((z.len() as u32) << 1).to_le_bytes()[..3].to_vec();
    v.extend_from_slice(&z);
    v
}

fn compressed(data: &[u8]) -> Vec<u8> {
    let mut v = ((data.len() as u32) << 1 | 1).to_le_bytes()[..3].to_vec();
    v.extend_from_slice(data);
    v
}

/// Undoes chunking and zstd, trusting the input (our own files).
fn inflate(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while !b.is_empty() {
        let h = u32::from_le_bytes([b[0], b[1], b[2], 0]);
        let (len, original) = ((h >> 1) as usize, h & 1 == 1);
        let c = &b[3..3 + len];
        if original {
            out.extend_from_slice(c);
        } else {
            out.extend(orc_decompress(c));
        }
        b = &b[3 + len..];
    }
    out
}

fn zstd_compress(data: &[u8]) -> Vec<u8> {
    // Through orc-rust's writer would need a file; zstd is one of its
    // dependencies, and ours, so use it directly.
    zstd::bulk::compress(data, 19).unwrap()
}

fn orc_decompress(c: &[u8]) -> Vec<u8> {
    zstd::bulk::decompress(c, 1 << 24).unwrap()
}

fn is_data(kind: proto::stream::Kind) -> bool {
    kind == proto::stream::Kind::Data
}

#[test]
fn a_decompression_bomb_is_refused_at_the_block_size_on_both_decoders() {
    let dir = tempdir();
    // One 64 MiB chunk of zeros, compressed to a few KiB, as the DATA
    // stream of every column: the int and float columns (our decoder) and
    // the string column (orc-rust's).
    let bomb = chunk(&vec![0u8; 64 << 20]);
    assert!(bomb.len() < 64 << 10);
    let path = restreamed(&dir, "bomb.orc", |_, st| is_data(st.kind()).then(|| bomb.clone()));
    let e = open_err(&path, Limits::default());
    assert!(e.contains("bomb.orc") && e.contains("inflates past the block size"), "{e}");
    // The string column alone (only orc-rust would read it).
    let string_col = 3;
    let path = restreamed(&dir, "bomb-str.orc", |_, st| {
        (is_data(st.kind()) && st.column() == string_col).then(|| bomb.clone())
    });
    let e = open_err(&path, Limits::default());
    assert!(e.contains("bomb-str.orc") && e.contains("column \"cat\"") && e.contains("block size"), "{e}");
}

#[test]
fn many_chunks_within_the_block_size_are_refused_past_the_stripe_limit() {
    let dir = tempdir();
    let one = chunk(&vec![0u8; 256 << 10]);
    let many: Vec<u8> = (0..64).flat_map(|_| one.iter().copied()).collect();
    let path = restreamed(&dir, "chunks.orc", |_, st| (is_data(st.kind()) && st.column() == 1).then(|| many.clone()));
    let limits = Limits { max_stripe_bytes: 8 << 20, ..Limits::default() };
    let e = open_err(&path, limits);
    assert!(e.contains("chunks.orc") && e.contains("max_stripe_bytes"), "{e}");
}

#[test]
fn a_chunk_running_past_its_stream_is_an_error_not_a_panic() {
    let dir = tempdir();
    // A header claiming 1000 bytes followed by 10: orc-rust's
    // `split_to out of bounds` panic, for each decoder's columns.
    let mut cut = (1000u32 << 1).to_le_bytes()[..3].to_vec();
    cut.extend_from_slice(&[7; 10]);
    for col in [1u32, 3] {
        let name = format!("cut-{col}.orc");
        let path = restreamed(&dir, &name, |_, st| (is_data(st.kind()) && st.column() == col).then(|| cut.clone()));
        let e = open_err(&path, Limits::default());
        assert!(e.contains(&name) && e.contains("runs past the end of its stream"), "{e}");
    }
}

#[test]
fn stripes_that_overlap_are_refused() {
    // orc-rust selects stripes by offset: a second stripe at the first's
    // offset would be read without our checks of its footer.
    let dir = tempdir();
    let path = edited(&dir, "overlap.orc", |f, _| {
        let mut twin = f.stripes[0].clone();
        twin.data_length = Some(twin.data_length() - 1);
        f.stripes.push(twin);
        f.number_of_rows = Some(2 * ROWS as u64);
    });
    let e = open_err(&path, Limits::default());
    assert!(e.contains("overlap.orc") && e.contains("stripe 1 (offset 3) overlaps"), "{e}");
}

#[test]
fn more_statistics_than_types_are_refused_before_they_are_decoded() {
    let dir = tempdir();
    let path = edited(&dir, "stats.orc", |f, _| f.statistics = vec![Default::default(); 1000]);
    let e = open_err(&path, Limits::default());
    assert!(e.contains("stats.orc") && e.contains("1000 statistics"), "{e}");
}

#[test]
fn streams_of_unknown_or_repeated_kinds_are_refused() {
    // orc-rust reads a stream of no kind as PRESENT: ours and its decoder
    // would read different bytes for one column.
    let dir = tempdir();
    let path = rebuilt(&dir, "nokind.orc", |_, _| None, |sf| sf.streams[1].kind = None);
    let e = open_err(&path, Limits::default());
    assert!(e.contains("nokind.orc") && e.contains("unknown kind"), "{e}");
    let path = rebuilt(
        &dir,
        "twice.orc",
        |_, _| None,
        |sf| {
            // The string column has DATA and LENGTH streams.
            let data = sf.streams.iter().position(|s| is_data(s.kind()) && s.column() == 3).unwrap();
            let other =
                sf.streams.iter().position(|s| s.kind() == proto::stream::Kind::Length && s.column() == 3).unwrap();
            sf.streams[other].kind = sf.streams[data].kind;
        },
    );
    let e = open_err(&path, Limits::default());
    assert!(e.contains("twice.orc") && e.contains("column 3 has two DATA streams"), "{e}");
}

#[test]
fn a_dictionary_larger_than_its_stripe_is_refused() {
    let dir = tempdir();
    let path = rebuilt(&dir, "dict.orc", |_, _| None, |sf| sf.columns[3].dictionary_size = Some(1 << 30));
    let e = open_err(&path, Limits::default());
    assert!(e.contains("dict.orc") && e.contains("column 3 claims a dictionary of 1073741824 entries"), "{e}");
}

fn tempdir() -> PathBuf {
    let d = std::env::temp_dir().join(format!(
        "recis-hostile-{}-{}",
        std::process::id(),
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos()
    ));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// zstd chunks of at most `block` bytes of `data` each.
fn chunked(data: &[u8], block: usize) -> Vec<u8> {
    data.chunks(block).flat_map(chunk).collect()
}

/// RLE v2 short repeats of `value` (one byte wide), `n` values in all.
fn repeats(value: u8, mut n: usize) -> Vec<u8> {
    let mut v = Vec::new();
    while n > 0 {
        let k = n.clamp(3, 10);
        assert!(k <= n, "a short repeat holds 3 to 10 values");
        v.extend_from_slice(&[(k - 3) as u8, value]);
        n -= k;
    }
    v
}

/// Column 3 ("cat", strings) of the written file rewritten as a
/// dictionary: entries `entries`, every row referring to entry `index`.
fn dictionary_file(dir: &Path, name: &str, entries: &[Vec<u8>], index: u8) -> PathBuf {
    use proto::stream::Kind;
    let block = 1 << 16;
    // Entry lengths: one RLE v2 direct run of 24-bit values.
    let n = entries.len();
    let mut lengths = vec![0b01 << 6 | 23 << 1 | ((n - 1) >> 8) as u8, (n - 1) as u8];
    for e in entries {
        let l = e.len() as u32;
        lengths.extend_from_slice(&[(l >> 16) as u8, (l >> 8) as u8, l as u8]);
    }
    let dictionary: Vec<u8> = entries.concat();
    let indices = repeats(index, ROWS);
    let extra = vec![(
        proto::Stream { kind: Some(Kind::DictionaryData as i32), column: Some(3), length: None },
        chunked(&dictionary, block),
    )];
    let n = entries.len() as u32;
    rebuilt_with(
        dir,
        name,
        |_, st| match (st.column(), st.kind()) {
            (3, Kind::Data) => Some(chunked(&indices, block)),
            (3, Kind::Length) => Some(chunked(&lengths, block)),
            _ => None,
        },
        move |sf| {
            sf.columns[3].kind = Some(proto::column_encoding::Kind::DictionaryV2 as i32);
            sf.columns[3].dictionary_size = Some(n);
        },
        extra,
    )
}

fn raw_columns() -> Vec<ColumnRequest> {
    vec![ColumnRequest { name: "cat".into(), hash: false, bucket: 0 }]
}

#[test]
fn a_dictionary_that_a_batch_would_repeat_past_the_decoded_limit_is_refused_before_orc_rust_copies_it() {
    let dir = tempdir();
    let big = vec![b'a'; 1 << 20];
    let path = dictionary_file(&dir, "amplified.orc", &[big.clone(), b"x".to_vec(), b"y".to_vec()], 0);
    // 3 MiB of dictionary, 1 MiB in every one of 2000 rows: 2 GiB decoded.
    let limits = Limits { max_decoded_bytes: 64 << 20, ..Limits::default() };
    let s = Source::open_with_limits(std::slice::from_ref(&path), &raw_columns(), limits).unwrap();
    let e = s.decode(&s.units[0], 0, 512, 512).unwrap_err().to_string();
    assert!(e.contains("amplified.orc") && e.contains("column \"cat\""), "{e}");
    assert!(
        e.contains("a batch of string column 3 decodes to more than 67108864 bytes (the max_decoded_bytes limit)"),
        "{e}"
    );

    // The same long entry, referred to by no row: the batches are summed
    // and the file reads, every row the short entry.
    let path = dictionary_file(&dir, "unused-long-entry.orc", &[big, b"x".to_vec(), b"y".to_vec()], 1);
    let s = Source::open_with_limits(&[path], &raw_columns(), limits).unwrap();
    let chunks = s.decode(&s.units[0], 0, 512, 512).unwrap();
    assert_eq!(chunks.iter().map(|c| c.rows).sum::<usize>(), ROWS);
    for c in &chunks {
        match &c.columns[0].values {
            recis_core::io::Values::Bytes { data, offsets } => {
                assert_eq!(offsets.len(), c.rows + 1);
                assert!(data.iter().all(|&b| b == b'x') && data.len() == c.rows, "{:?}", &data[..8]);
            }
            other => panic!("strings read as {other:?}"),
        }
    }
}

#[test]
fn a_dictionary_index_past_its_entries_is_an_error() {
    let dir = tempdir();
    let big = vec![b'a'; 1 << 20];
    let path = dictionary_file(&dir, "bad-index.orc", &[big, b"x".to_vec(), b"y".to_vec()], 7);
    let limits = Limits { max_decoded_bytes: 64 << 20, ..Limits::default() };
    let s = Source::open_with_limits(&[path], &raw_columns(), limits).unwrap();
    let e = s.decode(&s.units[0], 0, 512, 512).unwrap_err().to_string();
    assert!(e.contains("bad-index.orc") && e.contains("index 7 is past its dictionary of 3"), "{e}");
}

#[test]
fn a_stripe_decoding_past_the_decoded_limit_is_refused() {
    let dir = tempdir();
    let path = write(&dir, "decoded.orc", None);
    // 2000 rows of three 8-byte columns: 48 kB decoded.
    let limits = Limits { max_decoded_bytes: 20_000, ..Limits::default() };
    let s = Source::open_with_limits(std::slice::from_ref(&path), &columns(), limits).unwrap();
    let e = s.decode(&s.units[0], 0, 512, 512).unwrap_err().to_string();
    assert!(e.contains("decoded.orc") && e.contains("the max_decoded_bytes limit"), "{e}");
    let s = Source::open_with_limits(&[path], &columns(), Limits { max_decoded_bytes: 48_000, ..limits }).unwrap();
    assert_eq!(s.decode(&s.units[0], 0, 512, 512).unwrap().iter().map(|c| c.rows).sum::<usize>(), ROWS);
}
