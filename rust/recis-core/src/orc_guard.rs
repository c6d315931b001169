//! What an ORC file declares, checked against the file before anything is
//! allocated from it, and the file's compression undone within bounds.
//!
//! A file is read in this order, and each step is checked here before the
//! next one trusts it:
//! 1. the postscript (the file's last bytes): its footer and metadata
//!    lengths lie inside the file, its compression is known, and its block
//!    size is at most [`MAX_BLOCK`];
//! 2. the footer and metadata, inflated by [`inflate`] within
//!    [`MAX_TAIL_BYTES`]: the type tree is a tree (each type's children come
//!    after it and have one parent, so it cannot refer back to itself), of at
//!    most [`MAX_TYPES`] types and [`MAX_DEPTH`] levels; every stripe lies
//!    inside the file and declares at most [`Limits::max_stripe_rows`] rows;
//! 3. each stripe's footer ([`check_stripe`]): its streams add up to the
//!    stripe's length, name columns of the schema, and dictionary sizes are
//!    bounded.
//!
//! Only then does `orc-rust` (whose own tail parser recurses into the type
//! tree, allocates the footer length it reads, and unwraps on corrupt
//! compression chunks; orc-rust 0.9.0) or our decoder see the file.
//!
//! [`inflate`] replaces orc-rust's `Decompressor` on our paths: a chunk
//! inflates to at most the postscript's block size, and a stripe's streams to
//! at most [`Limits::max_stripe_bytes`] in all. For the columns that orc-rust
//! decodes, [`check_inflated`] runs the same bounded inflation over their
//! streams first, so that its unbounded decompressors only ever see chunks
//! known to fit.

use bytes::Bytes;
use orc_rust::proto::{self, r#type::Kind, Footer, Metadata, PostScript, StripeFooter};
use prost::Message;

type Result<T> = std::result::Result<T, String>;

/// The largest compression block a file may declare: chunk headers hold a
/// 23-bit length, so no writer can store a larger original chunk.
pub const MAX_BLOCK: u64 = 1 << 23;
/// The footer and metadata together inflate to at most this.
pub const MAX_TAIL_BYTES: u64 = 1 << 26;
/// Messages (stripes, types, statistics) the tail may hold, counted on the
/// wire before protobuf decoding builds them: an empty message costs 2
/// bytes on the wire and hundreds in memory.
pub const MAX_TAIL_MESSAGES: usize = 1 << 20;
/// Types (columns, nested ones included) of a schema.
pub const MAX_TYPES: usize = 1 << 16;
/// Nesting of a schema.
pub const MAX_DEPTH: usize = 64;
/// A stripe footer inflates to at most this.
const MAX_STRIPE_FOOTER: u64 = 1 << 26;

/// Bounds a reader puts on what a file may make it allocate. The defaults
/// are well above what ORC writers produce (stripes of 64 MiB or so) and
/// well below what would take a training host's memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Rows one stripe may declare.
    pub max_stripe_rows: u64,
    /// Bytes the streams of one stripe may inflate to, in all.
    pub max_stripe_bytes: u64,
    /// List elements in one column of one batch.
    pub max_list_elements: u64,
    /// Bytes the requested columns of one stripe may decode to, in all
    /// (values and offsets): a stripe's streams are bounded by
    /// `max_stripe_bytes`, but run-length and dictionary encodings
    /// multiply them (a string a dictionary holds once, a batch may repeat
    /// in every row).
    pub max_decoded_bytes: u64,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_stripe_rows: 1 << 27,
            max_stripe_bytes: 1 << 31,
            max_list_elements: 1 << 27,
            max_decoded_bytes: 1 << 31,
        }
    }
}

/// A file's codec.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Codec {
    Zlib,
    Snappy,
    Lzo,
    Lz4,
    Zstd,
}

/// How a file's streams are compressed: the codec and the largest chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Compression {
    pub codec: Codec,
    pub block: usize,
}

/// The checked tail of a file.
#[derive(Debug, Clone)]
pub(crate) struct Tail {
    pub compression: Option<Compression>,
    pub footer: Footer,
}

/// Reads and checks a file's postscript, footer and metadata.
pub(crate) fn read_tail(file: &Bytes, limits: &Limits) -> Result<Tail> {
    let len = file.len() as u64;
    if len == 0 {
        return Err("the file is empty".into());
    }
    if len < 4 || &file[..3] != b"ORC" {
        return Err("not an ORC file (it does not start with \"ORC\")".into());
    }
    let ps_len = file[file.len() - 1] as u64;
    if ps_len == 0 || ps_len + 1 + 3 > len {
        return Err(format!("the postscript claims {ps_len} bytes in a file of {len}"));
    }
    let ps_start = len - 1 - ps_len;
    let ps = PostScript::decode(&file[ps_start as usize..(len - 1) as usize])
        .map_err(|e| format!("the postscript is not valid: {e}"))?;
    if ps.magic.as_deref().is_some_and(|m| m != "ORC") {
        return Err("the postscript's magic is not \"ORC\"".into());
    }
    let footer_len = ps.footer_length.ok_or("the postscript has no footer length")?;
    let metadata_len = ps.metadata_length.unwrap_or(0);
    let tail_len = footer_len.checked_add(metadata_len).filter(|&t| t <= ps_start - 3).ok_or_else(|| {
        format!(
            "the postscript claims a footer of {footer_len} bytes and metadata of {metadata_len} in a file of {len}"
        )
    })?;
    let compression = compression_of(&ps)?;
    let footer_start = ps_start - footer_len;
    let content_end = ps_start - tail_len;
    let mut budget = MAX_TAIL_BYTES;
    let footer_bytes = inflate(&file.slice(footer_start as usize..ps_start as usize), compression, &mut budget)
        .map_err(|e| format!("footer: {e}"))?;
    // Footer: 3 stripes, 4 types, 7 statistics, 5 user metadata items.
    let counts = count_fields(&footer_bytes, &[3, 4, 7, 5]).map_err(|e| format!("the footer is not valid: {e}"))?;
    let (stripes, types, stats) = (counts[0], counts[1], counts[2]);
    if types > MAX_TYPES || stats > types || stripes + counts[3] > MAX_TAIL_MESSAGES {
        return Err(format!(
            "the footer claims {stripes} stripes, {types} types and {stats} statistics (limits: {MAX_TAIL_MESSAGES} stripes, {MAX_TYPES} types, one statistics entry a type)"
        ));
    }
    let footer = Footer::decode(footer_bytes).map_err(|e| format!("the footer is not valid: {e}"))?;
    let metadata_bytes = inflate(&file.slice(content_end as usize..footer_start as usize), compression, &mut budget)
        .map_err(|e| format!("metadata: {e}"))?;
    // Metadata: 1 stripe statistics, each of 1 column statistics.
    let mut messages = stripes + types + stats + counts[3];
    for stripe_stats in fields(&metadata_bytes, 1).map_err(|e| format!("the metadata is not valid: {e}"))? {
        let n = count_fields(stripe_stats, &[1]).map_err(|e| format!("the metadata is not valid: {e}"))?[0];
        if n > types {
            return Err(format!("the metadata has statistics of {n} columns for a schema of {types} types"));
        }
        messages += n + 1;
        if messages > MAX_TAIL_MESSAGES {
            return Err(format!("the footer and metadata hold more than {MAX_TAIL_MESSAGES} messages"));
        }
    }
    let metadata = Metadata::decode(metadata_bytes).map_err(|e| format!("the metadata is not valid: {e}"))?;
    if !metadata.stripe_stats.is_empty() && metadata.stripe_stats.len() != footer.stripes.len() {
        return Err(format!(
            "the metadata has statistics for {} stripes, the footer lists {}",
            metadata.stripe_stats.len(),
            footer.stripes.len()
        ));
    }
    if footer.encryption.is_some() {
        return Err("the file is encrypted, which RecIS cannot read".into());
    }
    check_types(&footer.types)?;
    let mut rows = 0u64;
    // Stripes follow one another: each starts at or after the end of the
    // one before and has a footer, so no two share bytes (orc-rust selects
    // stripes by offset, and would read one that shares another's).
    let mut prev_end = 3u64;
    for (i, s) in footer.stripes.iter().enumerate() {
        let n = s.number_of_rows();
        if n > limits.max_stripe_rows {
            return Err(format!("stripe {i} claims {n} rows, more than the limit of {}", limits.max_stripe_rows));
        }
        let end = s
            .offset()
            .checked_add(s.index_length())
            .and_then(|e| e.checked_add(s.data_length()))
            .and_then(|e| e.checked_add(s.footer_length()))
            .filter(|&e| s.offset() >= prev_end && s.footer_length() > 0 && e <= content_end);
        if s.offset() < prev_end && s.offset() >= 3 {
            return Err(format!(
                "stripe {i} (offset {}) overlaps the stripe before it (which ends at {prev_end})",
                s.offset()
            ));
        }
        if let Some(e) = end {
            prev_end = e;
        }
        if end.is_none() {
            return Err(format!(
                "stripe {i} (offset {}, {} + {} + {} bytes) lies outside the file's {content_end} bytes of stripes",
                s.offset(),
                s.index_length(),
                s.data_length(),
                s.footer_length()
            ));
        }
        rows = rows.checked_add(n).ok_or("the stripes' row counts overflow")?;
    }
    if let Some(total) = footer.number_of_rows {
        if total != rows {
            return Err(format!("the footer claims {total} rows, its stripes hold {rows}"));
        }
    }
    Ok(Tail { compression, footer })
}

fn compression_of(ps: &PostScript) -> Result<Option<Compression>> {
    use proto::CompressionKind as K;
    let kind = ps.compression.unwrap_or(0);
    let codec = match K::try_from(kind) {
        Ok(K::None) => return Ok(None),
        Ok(K::Zlib) => Codec::Zlib,
        Ok(K::Snappy) => Codec::Snappy,
        Ok(K::Lzo) => Codec::Lzo,
        Ok(K::Lz4) => Codec::Lz4,
        Ok(K::Zstd) => Codec::Zstd,
        _ => return Err(format!("unknown compression kind {kind}")),
    };
    let block = ps.compression_block_size.unwrap_or(256 * 1024);
    if block == 0 || block > MAX_BLOCK {
        return Err(format!("the compression block size {block} is outside 1..={MAX_BLOCK}"));
    }
    Ok(Some(Compression { codec, block: block as usize }))
}

/// The length-delimited fields numbered `field` of a protobuf message, on
/// the wire (no decoding): tags and lengths are checked, values skipped.
fn fields(msg: &[u8], field: u64) -> Result<Vec<&[u8]>> {
    let mut out = Vec::new();
    walk(msg, |f, v| {
        if f == field {
            if let Some(v) = v {
                out.push(v);
            }
        }
    })?;
    Ok(out)
}

/// How many times each of `wanted`'s field numbers occurs in a message.
fn count_fields(msg: &[u8], wanted: &[u64]) -> Result<Vec<usize>> {
    let mut n = vec![0usize; wanted.len()];
    walk(msg, |f, _| {
        if let Some(i) = wanted.iter().position(|&w| w == f) {
            n[i] += 1;
        }
    })?;
    Ok(n)
}

/// Visits the top-level fields of a protobuf message: (number, the bytes of
/// a length-delimited value).
fn walk<'a>(mut b: &'a [u8], mut visit: impl FnMut(u64, Option<&'a [u8]>)) -> Result<()> {
    fn varint(b: &mut &[u8]) -> Result<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let (&x, rest) = b.split_first().ok_or("a protobuf varint is cut short")?;
            *b = rest;
            v |= ((x & 0x7f) as u64) << shift;
            if x & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err("a protobuf varint is longer than 10 bytes".into())
    }
    while !b.is_empty() {
        let key = varint(&mut b)?;
        let (field, wire) = (key >> 3, key & 7);
        match wire {
            0 => {
                varint(&mut b)?;
                visit(field, None);
            }
            1 | 5 => {
                let n = if wire == 1 { 8 } else { 4 };
                b = b.get(n..).ok_or("a protobuf fixed field is cut short")?;
                visit(field, None);
            }
            2 => {
                let len = varint(&mut b)?;
                let len = usize::try_from(len)
                    .ok()
                    .filter(|&l| l <= b.len())
                    .ok_or("a protobuf field runs past its message")?;
                let (v, rest) = b.split_at(len);
                b = rest;
                visit(field, Some(v));
            }
            _ => return Err(format!("protobuf wire type {wire} (groups are not used by ORC)")),
        }
    }
    Ok(())
}

/// The schema is a tree rooted at a struct: every child index comes after
/// its parent's and has no other parent, so no type refers back to itself,
/// and nothing nests deeper than [`MAX_DEPTH`]. Child counts match kinds.
fn check_types(types: &[proto::Type]) -> Result<()> {
    if types.is_empty() {
        return Err("the schema has no types".into());
    }
    if types.len() > MAX_TYPES {
        return Err(format!("the schema has {} types, more than the limit of {MAX_TYPES}", types.len()));
    }
    let mut depth: Vec<Option<usize>> = vec![None; types.len()];
    depth[0] = Some(0);
    for (i, t) in types.iter().enumerate() {
        let kind = Kind::try_from(t.kind.unwrap_or(-1)).map_err(|_| format!("type {i} has an unknown kind"))?;
        if i == 0 && kind != Kind::Struct {
            return Err(format!("the root type is {}, not a struct", kind.as_str_name()));
        }
        let n = t.subtypes.len();
        let fits = match kind {
            Kind::Struct => n == t.field_names.len(),
            Kind::List => n == 1,
            Kind::Map => n == 2,
            Kind::Union => (1..=127).contains(&n),
            _ => n == 0,
        };
        if !fits {
            return Err(format!(
                "type {i} ({}) has {n} children and {} field names",
                kind.as_str_name(),
                t.field_names.len()
            ));
        }
        let Some(d) = depth[i] else { continue };
        for &c in &t.subtypes {
            let c = c as usize;
            if c <= i || c >= types.len() {
                return Err(format!("type {i} names child {c}, outside {}..{}", i + 1, types.len()));
            }
            if depth[c].is_some() {
                return Err(format!("type {c} has two parents"));
            }
            if d + 1 > MAX_DEPTH {
                return Err(format!("the schema nests deeper than {MAX_DEPTH} levels"));
            }
            depth[c] = Some(d + 1);
        }
    }
    Ok(())
}

/// Reads and checks the footer of stripe `index`: its streams add up to the
/// stripe's index and data lengths and name columns of the schema; its
/// dictionaries are no larger than the stripe's row limit.
pub(crate) fn check_stripe(file: &Bytes, tail: &Tail, index: usize, limits: &Limits) -> Result<StripeFooter> {
    let s = tail.footer.stripes.get(index).ok_or_else(|| format!("there is no stripe {index}"))?;
    // read_tail checked that these add up within the file.
    let at = s.offset() + s.index_length() + s.data_length();
    let mut budget = MAX_STRIPE_FOOTER;
    let raw = inflate(&file.slice(at as usize..(at + s.footer_length()) as usize), tail.compression, &mut budget)
        .map_err(|e| format!("stripe footer: {e}"))?;
    let columns = tail.footer.types.len();
    // StripeFooter: 1 streams, 2 column encodings.
    let counts = count_fields(&raw, &[1, 2]).map_err(|e| format!("the stripe footer is not valid: {e}"))?;
    if counts[0] > columns * 16 || counts[1] > columns {
        return Err(format!(
            "the stripe footer lists {} streams and {} encodings for {columns} columns",
            counts[0], counts[1]
        ));
    }
    let footer = StripeFooter::decode(raw).map_err(|e| format!("the stripe footer is not valid: {e}"))?;
    let mut total = 0u64;
    let mut seen = std::collections::HashSet::new();
    for st in &footer.streams {
        if st.column() as usize >= columns {
            return Err(format!("a stream names column {}, but the schema has {columns}", st.column()));
        }
        // A kind that is absent or unknown reads as PRESENT to orc-rust
        // (prost's default), so it would read another stream than ours.
        let kind = st.kind.and_then(|k| proto::stream::Kind::try_from(k).ok());
        let Some(kind) = kind else {
            return Err(format!("a stream of column {} has an unknown kind {:?}", st.column(), st.kind));
        };
        if !seen.insert((st.column(), kind as i32)) {
            return Err(format!("column {} has two {} streams", st.column(), kind.as_str_name()));
        }
        total = total.checked_add(st.length()).ok_or("stream lengths overflow")?;
    }
    if total != s.index_length() + s.data_length() {
        return Err(format!(
            "the streams add up to {total} bytes, the stripe holds {}",
            s.index_length() + s.data_length()
        ));
    }
    if footer.columns.len() != columns {
        return Err(format!("the stripe has {} column encodings for {columns} columns", footer.columns.len()));
    }
    // A dictionary holds at most one entry per value: a row's, or a list
    // element's (at most max_list_elements a batch, a batch at least a row).
    let values = s.number_of_rows().saturating_mul(limits.max_list_elements.max(1)).max(s.number_of_rows());
    for (c, e) in footer.columns.iter().enumerate() {
        let under_list = tail
            .footer
            .types
            .iter()
            .any(|t| t.kind() == Kind::List && t.subtypes.first().is_some_and(|&x| x as usize == c));
        let bound = if under_list { values } else { s.number_of_rows() };
        if e.dictionary_size() as u64 > bound {
            return Err(format!(
                "column {c} claims a dictionary of {} entries in a stripe of {} rows",
                e.dictionary_size(),
                s.number_of_rows()
            ));
        }
    }
    if !footer.encryption.is_empty() {
        return Err("the stripe is encrypted, which RecIS cannot read".into());
    }
    Ok(footer)
}

/// Each stream of a stripe with its byte range in the file: the streams lie
/// one after another from the stripe's offset (`check_stripe` checked that
/// they add up to the stripe's length inside the file).
pub(crate) fn stream_ranges(
    footer: &StripeFooter,
    offset: u64,
) -> impl Iterator<Item = (&proto::Stream, std::ops::Range<usize>)> {
    footer.streams.iter().scan(offset, |at, st| {
        let start = *at;
        *at += st.length();
        Some((st, start as usize..*at as usize))
    })
}

/// Inflates the streams of `columns` of a stripe within `budget` bytes,
/// discarding the output: it proves that every chunk of them fits before a
/// decoder without bounds (orc-rust's) inflates them.
pub(crate) fn check_inflated(
    file: &Bytes,
    offset: u64,
    footer: &StripeFooter,
    columns: &[usize],
    compression: Option<Compression>,
    budget: &mut u64,
    label: &dyn Fn(u32) -> String,
) -> Result<()> {
    if compression.is_none() {
        return Ok(());
    }
    for (st, range) in stream_ranges(footer, offset) {
        if columns.contains(&(st.column() as usize)) {
            check_inflates(&file.slice(range), compression, budget)
                .map_err(|e| format!("{}: {e}", label(st.column())))?;
        }
    }
    Ok(())
}

/// Undoes ORC's compression of one stream: a series of chunks, each a 3-byte
/// header (length << 1 | original) and that many bytes, stored as they are
/// or compressed. A chunk inflates to at most the block size, and all of
/// them to at most `budget` bytes (which is charged). Uncompressed streams
/// are returned as they are, with no copy.
pub(crate) fn inflate(data: &Bytes, compression: Option<Compression>, budget: &mut u64) -> Result<Bytes> {
    let Some(c) = compression else { return Ok(data.clone()) };
    // The output's size, at most: a pass over the chunk headers (a block for
    // each compressed chunk), so that `out` is allocated once, not grown.
    let mut bound = 0u64;
    let mut at = 0usize;
    while let Some(h) = data.get(at..at + 3) {
        let h = u32::from_le_bytes([h[0], h[1], h[2], 0]);
        let len = (h >> 1) as usize;
        bound += if h & 1 == 1 { len as u64 } else { c.block as u64 };
        at += 3 + len;
    }
    let mut out: Vec<u8> = Vec::new();
    // A bound the allocator refuses is not an error: `out` then grows.
    let _ = out.try_reserve_exact(bound.min(*budget) as usize);
    chunks(data, c, budget, |part| out.extend_from_slice(part))?;
    Ok(out.into())
}

/// As [`inflate`], keeping nothing: only whether the stream inflates
/// within the bounds, charged to `budget` (one block of scratch memory).
pub(crate) fn check_inflates(data: &Bytes, compression: Option<Compression>, budget: &mut u64) -> Result<()> {
    match compression {
        Some(c) => chunks(data, c, budget, |_| {}),
        None => Ok(()),
    }
}

/// Inflates each chunk of a stream in turn and hands it to `sink`.
fn chunks(data: &Bytes, c: Compression, budget: &mut u64, mut sink: impl FnMut(&[u8])) -> Result<()> {
    let mut scratch: Vec<u8> = Vec::new();
    // One zstd context for all the stream's chunks, made at the first.
    let mut zstd: Option<zstd::bulk::Decompressor<'static>> = None;
    let mut pos = 0usize;
    while pos < data.len() {
        let h = data.get(pos..pos + 3).ok_or("a compression chunk header is cut short")?;
        let h = u32::from_le_bytes([h[0], h[1], h[2], 0]);
        let (len, original) = ((h >> 1) as usize, h & 1 == 1);
        pos += 3;
        let chunk = data.get(pos..pos + len).ok_or_else(|| {
            format!("a compression chunk of {len} bytes runs past the end of its stream ({} left)", data.len() - pos)
        })?;
        pos += len;
        if len > c.block {
            return Err(format!("a compression chunk of {len} bytes is larger than the block size {}", c.block));
        }
        let part: &[u8] = if original {
            chunk
        } else {
            let n = decompress(c, chunk, &mut scratch, &mut zstd)?;
            &scratch[..n]
        };
        let n = part.len() as u64;
        if n > *budget {
            return Err(format!("the data inflates past the limit (max_stripe_bytes, {} bytes left)", *budget));
        }
        *budget -= n;
        sink(part);
    }
    Ok(())
}

/// One compressed chunk into `out[..n]`, refused past `c.block` bytes:
/// returns n.
fn decompress(
    c: Compression,
    src: &[u8],
    out: &mut Vec<u8>,
    zstd: &mut Option<zstd::bulk::Decompressor<'static>>,
) -> Result<usize> {
    let block = c.block;
    let too_big = || format!("a compression chunk inflates past the block size {block}");
    if c.codec != Codec::Lz4 {
        out.clear();
    }
    match c.codec {
        Codec::Zstd => {
            out.reserve(block);
            let d = match zstd {
                Some(d) => d,
                None => zstd.insert(zstd::bulk::Decompressor::new().map_err(|e| format!("zstd: {e}"))?),
            };
            let n = d
                .decompress_to_buffer(src, out)
                .map_err(|e| format!("a zstd chunk is corrupt or inflates past the block size {block}: {e}"))?;
            if n > block {
                return Err(too_big());
            }
        }
        Codec::Zlib => {
            out.reserve(block + 1);
            let mut d = flate2::Decompress::new(false);
            let status = d
                .decompress_vec(src, out, flate2::FlushDecompress::Finish)
                .map_err(|e| format!("a zlib chunk is corrupt: {e}"))?;
            if out.len() > block {
                return Err(too_big());
            }
            if status != flate2::Status::StreamEnd {
                return Err(if out.len() == out.capacity() { too_big() } else { "a zlib chunk is cut short".into() });
            }
        }
        Codec::Snappy => {
            let n = snap::raw::decompress_len(src).map_err(|e| format!("a snappy chunk is corrupt: {e}"))?;
            if n > block {
                return Err(too_big());
            }
            out.resize(n, 0);
            snap::raw::Decoder::new().decompress(src, out).map_err(|e| format!("a snappy chunk is corrupt: {e}"))?;
        }
        Codec::Lz4 => {
            // The buffer stays a block long across chunks (no memset each).
            out.resize(block, 0);
            let n = lz4_flex::block::decompress_into(src, out)
                .map_err(|e| format!("an lz4 chunk is corrupt or inflates past the block size {block}: {e}"))?;
            return Ok(n);
        }
        Codec::Lzo => {
            // lzokay-native (orc-rust's LZO decoder) has no output bound
            // (one chunk can inflate about 255-fold before its size can be
            // checked) and panics on some corrupt input: refused.
            return Err("LZO-compressed ORC is not supported (its decoder cannot bound its output); \
                        rewrite the file with zstd, zlib, snappy or lz4"
                .into());
        }
    }
    Ok(out.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunked(parts: &[(&[u8], bool)]) -> Bytes {
        let mut v = Vec::new();
        for (p, original) in parts {
            let h = ((p.len() as u32) << 1) | *original as u32;
            v.extend_from_slice(&h.to_le_bytes()[..3]);
            v.extend_from_slice(p);
        }
        v.into()
    }

    #[test]
    fn a_zstd_bomb_is_refused_at_the_block_size() {
        let bomb = zstd::bulk::compress(&vec![0u8; 64 << 20], 19).unwrap();
        let c = Compression { codec: Codec::Zstd, block: 256 << 10 };
        let stream = chunked(&[(&bomb[..], false)]);
        let mut budget = u64::MAX;
        let e = inflate(&stream, Some(c), &mut budget).unwrap_err();
        assert!(e.contains("block size"), "{e}");
    }

    #[test]
    fn chunks_within_bounds_inflate_and_charge_the_budget() {
        let data: Vec<u8> = (0..100_000u32).flat_map(|i| (i % 251).to_le_bytes()).collect();
        for codec in [Codec::Zstd, Codec::Zlib, Codec::Snappy, Codec::Lz4] {
            let c = Compression { codec, block: 1 << 20 };
            let packed = match codec {
                Codec::Zstd => zstd::bulk::compress(&data, 3).unwrap(),
                Codec::Zlib => {
                    use std::io::Write;
                    let mut e = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
                    e.write_all(&data).unwrap();
                    e.finish().unwrap()
                }
                Codec::Snappy => snap::raw::Encoder::new().compress_vec(&data).unwrap(),
                Codec::Lz4 => lz4_flex::block::compress(&data),
                Codec::Lzo => unreachable!(),
            };
            let stream = chunked(&[(&packed[..], false), (b"tail", true)]);
            let mut budget = 1 << 30;
            let out = inflate(&stream, Some(c), &mut budget).unwrap();
            assert_eq!(&out[..data.len()], &data[..], "{codec:?}");
            assert_eq!(&out[data.len()..], b"tail");
            assert_eq!(budget, (1 << 30) - data.len() as u64 - 4);
            // The same stream over a smaller budget, or a smaller block.
            let mut small = 1000;
            assert!(inflate(&stream, Some(c), &mut small).unwrap_err().contains("limit"), "{codec:?}");
            let tight = Compression { codec, block: data.len() - 1 };
            assert!(inflate(&stream, Some(tight), &mut budget).is_err(), "{codec:?}");
        }
    }

    #[test]
    fn lzo_is_refused_and_lz4_reuses_its_buffer() {
        let c = Some(Compression { codec: Codec::Lzo, block: 1 << 16 });
        let mut b = u64::MAX;
        let e = inflate(&chunked(&[(b"\x11\x00\x00", false)]), c, &mut b).unwrap_err();
        assert!(e.contains("LZO"), "{e}");
        // Many one-byte lz4 chunks: each inflates into the same buffer.
        let one = lz4_flex::block::compress(b"x");
        let parts: Vec<(&[u8], bool)> = (0..1000).map(|_| (&one[..], false)).collect();
        let c = Some(Compression { codec: Codec::Lz4, block: 1 << 23 });
        assert_eq!(&inflate(&chunked(&parts), c, &mut b).unwrap()[..], &[b'x'; 1000][..]);
    }

    #[test]
    fn protobuf_fields_are_counted_on_the_wire() {
        // Field 7 (length-delimited, empty) three times, a varint field 1,
        // a fixed64 field 2.
        let msg = [0x3a, 0x00, 0x3a, 0x00, 0x08, 0x96, 0x01, 0x11, 1, 2, 3, 4, 5, 6, 7, 8, 0x3a, 0x00];
        assert_eq!(count_fields(&msg, &[7, 1, 2, 9]).unwrap(), vec![3, 1, 1, 0]);
        assert!(count_fields(&[0x3a, 0x05, 0x00], &[7]).is_err());
        assert!(count_fields(&[0x08], &[1]).is_err());
        assert!(count_fields(&[0x0b], &[1]).is_err()); // a group
    }

    #[test]
    fn cut_streams_are_errors() {
        let c = Some(Compression { codec: Codec::Zstd, block: 1 << 16 });
        let mut b = u64::MAX;
        assert!(inflate(&Bytes::from_static(&[1, 0]), c, &mut b).unwrap_err().contains("header"));
        assert!(inflate(&Bytes::from_static(&[0x21, 0, 0, 1, 2]), c, &mut b).unwrap_err().contains("past the end"));
    }

    fn ty(kind: Kind, subtypes: &[u32], names: &[&str]) -> proto::Type {
        proto::Type {
            kind: Some(kind as i32),
            subtypes: subtypes.to_vec(),
            field_names: names.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn type_trees_that_loop_share_or_nest_too_deep_are_refused() {
        let ok = [
            ty(Kind::Struct, &[1, 2], &["a", "b"]),
            ty(Kind::Long, &[], &[]),
            ty(Kind::List, &[3], &[]),
            ty(Kind::Int, &[], &[]),
        ];
        check_types(&ok).unwrap();
        let back = [ty(Kind::Struct, &[1], &["a"]), ty(Kind::List, &[0], &[])];
        assert!(check_types(&back).unwrap_err().contains("outside"));
        let itself = [ty(Kind::Struct, &[1], &["a"]), ty(Kind::List, &[1], &[])];
        assert!(check_types(&itself).is_err());
        let shared = [ty(Kind::Struct, &[1, 2], &["a", "b"]), ty(Kind::List, &[2], &[]), ty(Kind::Int, &[], &[])];
        assert!(check_types(&shared).unwrap_err().contains("two parents"));
        let mut deep = vec![ty(Kind::Struct, &[1], &["a"])];
        for i in 1..100u32 {
            deep.push(ty(Kind::List, &[i + 1], &[]));
        }
        deep.push(ty(Kind::Int, &[], &[]));
        assert!(check_types(&deep).unwrap_err().contains("deeper"));
        assert!(check_types(&[ty(Kind::Int, &[], &[])]).unwrap_err().contains("root"));
        let names = [ty(Kind::Struct, &[1], &[]), ty(Kind::Int, &[], &[])];
        assert!(check_types(&names).is_err());
    }
}
