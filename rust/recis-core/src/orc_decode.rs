//! Our own decoder for the ORC columns CTR data is made of: integers
//! (short/int/long, RLE v2), floats, doubles, and lists of those, each
//! with or without nulls.
//!
//! Why not only `orc-rust`: its decoders copy every stream twice before
//! reading it (`BytesMut::from`, then a clone per block) and read integers
//! a byte at a time through `std::io::Read`; on uncompressed files that is
//! most of the decoding time (`benches/orc_reader.py`, BENCHMARKS.md). Here
//! the streams of an uncompressed file are slices of the memory-mapped file
//! and the decoders work on byte slices. Compressed streams are inflated
//! once, within bounds, by `orc_guard::inflate`.
//!
//! Everything else (strings, booleans, tinyints, RLE v1 and dictionary
//! encodings) stays with `orc-rust`: [`Source::decode`](crate::io::Source)
//! asks [`fast_kind`] which columns this module takes, stripe by stripe.
//!
//! The integer run encodings follow the ORC v1 specification
//! (<https://orc.apache.org/specification/ORCv1/>): short repeat, direct,
//! patched base and delta. Corrupt input is an error, never a panic or an
//! out-of-bounds read.

use crate::column::{Column, Values};
use crate::orc_guard::{inflate, Compression};
use bytes::Bytes;
use orc_rust::proto::column_encoding::Kind as EncodingKind;
use orc_rust::proto::stream::Kind as StreamKind;
use orc_rust::proto::StripeFooter;
use orc_rust::schema::DataType;
use std::collections::HashMap;

type Result<T> = std::result::Result<T, String>;

/// The value kind of a column this module decodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Leaf {
    Int,
    Float32,
    Float64,
}

/// What this module reads of a column: its leaf kind and whether it is a
/// list, or None when the column is left to `orc-rust`.
pub(crate) fn fast_kind(dt: &DataType, footer: &StripeFooter) -> Option<(Leaf, bool)> {
    let v2 = |i: usize| footer.columns.get(i).is_some_and(|c| c.kind() == EncodingKind::DirectV2);
    let leaf = |dt: &DataType| match dt {
        DataType::Short { column_index } | DataType::Int { column_index } | DataType::Long { column_index } => {
            v2(*column_index).then_some(Leaf::Int)
        }
        DataType::Float { .. } => Some(Leaf::Float32),
        DataType::Double { .. } => Some(Leaf::Float64),
        _ => None,
    };
    match dt {
        DataType::List { column_index, child } => {
            if v2(*column_index) {
                leaf(child).map(|l| (l, true))
            } else {
                None
            }
        }
        other => leaf(other).map(|l| (l, false)),
    }
}

/// The streams of one stripe, by (column, kind): slices of `file`, or
/// inflated within the stripe's budget when the file is compressed.
pub(crate) struct Streams {
    map: HashMap<(u32, i32), Bytes>,
}

impl Streams {
    /// `file` holds the whole file; `offset` is the stripe's, whose footer
    /// `orc_guard::check_stripe` has checked; only the streams of `columns`
    /// are kept.
    pub(crate) fn new(
        file: &Bytes,
        offset: u64,
        footer: &StripeFooter,
        columns: &[usize],
        compression: Option<Compression>,
        budget: &mut u64,
        label: &dyn Fn(u32) -> String,
    ) -> Result<Streams> {
        Streams::select(file, offset, footer, columns, None, compression, budget, label)
    }

    /// As [`Streams::new`], keeping only the streams of `kinds` (all when
    /// None).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn select(
        file: &Bytes,
        offset: u64,
        footer: &StripeFooter,
        columns: &[usize],
        kinds: Option<&[StreamKind]>,
        compression: Option<Compression>,
        budget: &mut u64,
        label: &dyn Fn(u32) -> String,
    ) -> Result<Streams> {
        let mut map = HashMap::new();
        for (st, range) in crate::orc_guard::stream_ranges(footer, offset) {
            if range.end > file.len() {
                return Err(format!("a stream of column {} runs past the end of the file", st.column()));
            }
            let wanted = kinds.is_none_or(|k| k.iter().any(|&k| k as i32 == st.kind.unwrap_or(-1)));
            if wanted && columns.contains(&(st.column() as usize)) {
                let data = inflate(&file.slice(range), compression, budget)
                    .map_err(|e| format!("{}: {e}", label(st.column())))?;
                map.insert((st.column(), st.kind.unwrap_or(-1)), data);
            }
        }
        Ok(Streams { map })
    }

    fn get(&self, column: usize, kind: StreamKind) -> Option<Bytes> {
        self.map.get(&(column as u32, kind as i32)).cloned()
    }

    fn need(&self, column: usize, kind: StreamKind) -> Result<Bytes> {
        self.get(column, kind).ok_or_else(|| format!("column {column} has no {} stream", kind.as_str_name()))
    }
}

/// Reads a column row run by row run.
pub(crate) struct ColumnDecoder {
    present: Option<BoolRle>,
    /// List columns: the lengths and the element's own present stream.
    lengths: Option<(RleV2, Option<BoolRle>)>,
    leaf: LeafDecoder,
    /// List elements one read may return.
    max_elements: u64,
}

impl ColumnDecoder {
    pub(crate) fn new(dt: &DataType, leaf: Leaf, streams: &Streams, max_elements: u64) -> Result<ColumnDecoder> {
        let id = dt.column_index();
        let present = streams.get(id, StreamKind::Present).map(BoolRle::new);
        let (lengths, leaf_id) = match dt {
            DataType::List { child, .. } => {
                let lengths = RleV2::new(streams.need(id, StreamKind::Length)?, false);
                let child_present = streams.get(child.column_index(), StreamKind::Present).map(BoolRle::new);
                (Some((lengths, child_present)), child.column_index())
            }
            _ => (None, id),
        };
        let data = streams.need(leaf_id, StreamKind::Data)?;
        let leaf = match leaf {
            Leaf::Int => LeafDecoder::Int(RleV2::new(data, true)),
            Leaf::Float32 => LeafDecoder::Float32(Raw::new(data)),
            Leaf::Float64 => LeafDecoder::Float64(Raw::new(data)),
        };
        Ok(ColumnDecoder { present, lengths, leaf, max_elements })
    }

    /// The next `rows` rows. Nulls read as 0 (ints), NaN (floats) and []
    /// (lists), as in `io`.
    pub(crate) fn read(&mut self, rows: usize) -> Result<Column> {
        let valid = match &mut self.present {
            Some(p) => Some(p.read(rows)?),
            None => None,
        };
        let non_null = valid.as_ref().map_or(rows, |v| v.iter().filter(|&&b| b).count());
        match &mut self.lengths {
            None => Ok(Column { values: self.leaf.read(non_null, valid.as_deref())?, offsets: None }),
            Some((lengths, child_present)) => {
                let mut lens = Vec::new();
                lengths.read(non_null, &mut lens)?;
                let mut offsets = Vec::with_capacity(rows + 1);
                offsets.push(0i64);
                let mut total = 0i64;
                let mut it = lens.iter();
                for r in 0..rows {
                    if valid.as_ref().is_none_or(|v| v[r]) {
                        let n = *it.next().expect("one length per non-null row");
                        if n < 0 {
                            return Err(format!("negative list length {n}"));
                        }
                        total = total.checked_add(n).ok_or("list lengths overflow")?;
                        if total as u64 > self.max_elements {
                            return Err(format!(
                                "{rows} rows of a list column hold more than {} elements (the max_list_elements limit)",
                                self.max_elements
                            ));
                        }
                    }
                    offsets.push(total);
                }
                let elems = total as usize;
                let elem_valid = match child_present {
                    Some(p) => Some(p.read(elems)?),
                    None => None,
                };
                let non_null = elem_valid.as_ref().map_or(elems, |v| v.iter().filter(|&&b| b).count());
                Ok(Column { values: self.leaf.read(non_null, elem_valid.as_deref())?, offsets: Some(offsets) })
            }
        }
    }
}

/// Checks, before orc-rust decodes a list column, that none of its batches
/// (`batch` rows each from the stripe's first row, as orc-rust reads them)
/// holds more than `max` elements: orc-rust sizes its buffers by the sum of
/// a batch's lengths. `column` is the list column's index.
pub(crate) fn check_list_batches(
    column: usize,
    footer: &StripeFooter,
    streams: &Streams,
    rows: u64,
    batch: usize,
    max: u64,
) -> Result<Vec<u64>> {
    let v2 = match footer.columns.get(column).map(|c| c.kind()) {
        Some(EncodingKind::DirectV2) => true,
        Some(EncodingKind::Direct) => false,
        other => return Err(format!("list column {column} has encoding {other:?}")),
    };
    let mut present = streams.get(column, StreamKind::Present).map(BoolRle::new);
    // Writers may leave out an empty stream (a stripe of null lists).
    let data = streams.get(column, StreamKind::Length).unwrap_or_default();
    let mut lengths = Unsigned::new(data, v2);
    let mut left = rows;
    let mut lens = Vec::new();
    let mut totals = Vec::new();
    while left > 0 {
        let n = (batch as u64).min(left) as usize;
        left -= n as u64;
        let non_null = match &mut present {
            Some(p) => p.read(n)?.iter().filter(|&&b| b).count(),
            None => n,
        };
        lens.clear();
        lengths.read(non_null, &mut lens)?;
        let mut total = 0u64;
        for &l in &lens {
            total =
                u64::try_from(l).ok().and_then(|l| total.checked_add(l)).filter(|&t| t <= max).ok_or_else(|| {
                    format!(
                        "{n} rows of list column {column} hold more than {max} elements (the max_list_elements limit)"
                    )
                })?;
        }
        totals.push(total);
    }
    Ok(totals)
}

/// Checks, before orc-rust decodes a dictionary-encoded string column,
/// that none of its batches decodes to more than `max` bytes: orc-rust
/// copies a dictionary entry into every row that refers to it, so a
/// stripe of small streams can make a batch of any size. `batches` are the
/// column's value counts per batch, as orc-rust reads them (rows, or a list
/// column's elements). The bound from the longest entry settles it in
/// general; only past it are the batches summed, entry by entry.
pub(crate) fn check_string_batches(
    column: usize,
    footer: &StripeFooter,
    streams: &dyn Fn(&[StreamKind]) -> Result<Streams>,
    batches: &[u64],
    max: u64,
) -> Result<()> {
    let encoding = footer.columns.get(column);
    let v2 = match encoding.map(|c| c.kind()) {
        Some(EncodingKind::DictionaryV2) => true,
        Some(EncodingKind::Dictionary) => false,
        // Direct: a batch's bytes are in the DATA stream, which the
        // stripe's inflate budget bounds.
        _ => return Ok(()),
    };
    let size = encoding.map_or(0, |c| c.dictionary_size()) as usize;
    let ints = |streams: &Streams, kind: StreamKind| Unsigned::new(streams.get(column, kind).unwrap_or_default(), v2);
    let mut lengths = Vec::with_capacity(size.min(1 << 20));
    ints(&streams(&[StreamKind::Length])?, StreamKind::Length)
        .read(size, &mut lengths)
        .map_err(|e| format!("string column {column}: its dictionary's lengths: {e}"))?;
    let longest = lengths.iter().map(|&l| u64::try_from(l).unwrap_or(u64::MAX)).max().unwrap_or(0);
    let most = batches.iter().copied().max().unwrap_or(0);
    if longest.saturating_mul(most) <= max {
        return Ok(());
    }
    let too_big =
        || format!("a batch of string column {column} decodes to more than {max} bytes (the max_decoded_bytes limit)");
    let streams = streams(&[StreamKind::Present, StreamKind::Data])?;
    let mut present = streams.get(column, StreamKind::Present).map(BoolRle::new);
    let mut indices = ints(&streams, StreamKind::Data);
    let mut at = Vec::new();
    for &n in batches {
        let n = n as usize;
        let non_null = match &mut present {
            Some(p) => p.read(n)?.iter().filter(|&&b| b).count(),
            None => n,
        };
        at.clear();
        indices.read(non_null, &mut at).map_err(|e| format!("string column {column}: its dictionary indices: {e}"))?;
        let mut total = 0u64;
        for &i in &at {
            let len = usize::try_from(i)
                .ok()
                .and_then(|i| lengths.get(i))
                .ok_or_else(|| format!("string column {column}: index {i} is past its dictionary of {size}"))?;
            total = total.saturating_add(*len as u64);
            if total > max {
                return Err(too_big());
            }
        }
    }
    Ok(())
}

/// An unsigned integer stream of either run-length encoding.
enum Unsigned {
    V1(RleV1),
    V2(RleV2),
}

impl Unsigned {
    fn new(data: Bytes, v2: bool) -> Unsigned {
        if v2 {
            Unsigned::V2(RleV2::new(data, false))
        } else {
            Unsigned::V1(RleV1::new(data))
        }
    }

    fn read(&mut self, n: usize, out: &mut Vec<i64>) -> Result<()> {
        match self {
            Unsigned::V1(d) => d.read(n, out),
            Unsigned::V2(d) => d.read(n, out),
        }
    }
}

/// Integer run-length encoding, version 1 (unsigned): runs of 3..=130
/// values with a fixed delta, or literal lists of 1..=128 varints.
struct RleV1 {
    src: Cursor,
    run: Vec<i64>,
    at: usize,
}

impl RleV1 {
    fn new(data: Bytes) -> RleV1 {
        RleV1 { src: Cursor { data, pos: 0 }, run: Vec::with_capacity(130), at: 0 }
    }

    fn read(&mut self, mut n: usize, out: &mut Vec<i64>) -> Result<()> {
        while n > 0 {
            if self.at == self.run.len() {
                self.run.clear();
                self.at = 0;
                let h = self.src.byte()? as i8;
                if h >= 0 {
                    let delta = self.src.byte()? as i8 as i64;
                    let base = self.src.varint()? as i64;
                    self.run.extend((0..h as i64 + 3).map(|i| base.wrapping_add(delta.wrapping_mul(i))));
                } else {
                    for _ in 0..-(h as i32) {
                        let v = self.src.varint()? as i64;
                        self.run.push(v);
                    }
                }
            }
            let take = n.min(self.run.len() - self.at);
            out.extend_from_slice(&self.run[self.at..self.at + take]);
            self.at += take;
            n -= take;
        }
        Ok(())
    }
}

enum LeafDecoder {
    Int(RleV2),
    Float32(Raw),
    Float64(Raw),
}

impl LeafDecoder {
    /// `n` stored values, spread over the rows `valid` marks (all when None).
    fn read(&mut self, n: usize, valid: Option<&[bool]>) -> Result<Values> {
        Ok(match self {
            LeafDecoder::Int(d) => {
                let mut v = Vec::with_capacity(valid.map_or(n, <[bool]>::len).min(1 << 20));
                d.read(n, &mut v)?;
                Values::Int(spread(v, valid, 0))
            }
            LeafDecoder::Float32(d) => {
                Values::Float32(spread(d.read(n, 4, |b| f32::from_le_bytes(b.try_into().unwrap()))?, valid, f32::NAN))
            }
            LeafDecoder::Float64(d) => {
                Values::Float64(spread(d.read(n, 8, |b| f64::from_le_bytes(b.try_into().unwrap()))?, valid, f64::NAN))
            }
        })
    }
}

/// Puts the values of the valid rows in place and `fill` in the others,
/// in place, back to front.
fn spread<T: Copy>(mut v: Vec<T>, valid: Option<&[bool]>, fill: T) -> Vec<T> {
    let Some(valid) = valid else { return v };
    let n = v.len();
    v.resize(valid.len(), fill);
    let mut src = n;
    for dst in (0..valid.len()).rev() {
        if valid[dst] {
            src -= 1;
            v[dst] = v[src];
        } else {
            v[dst] = fill;
        }
    }
    v
}

/// Fixed-width little-endian values (floats, doubles).
struct Raw {
    data: Bytes,
    pos: usize,
}

impl Raw {
    fn new(data: Bytes) -> Raw {
        Raw { data, pos: 0 }
    }

    fn read<T>(&mut self, n: usize, width: usize, f: impl Fn(&[u8]) -> T) -> Result<Vec<T>> {
        let end = n.checked_mul(width).and_then(|b| b.checked_add(self.pos)).ok_or("a float stream ends early")?;
        let bytes = self.data.get(self.pos..end).ok_or("a float stream ends early")?;
        self.pos = end;
        Ok(bytes.chunks_exact(width).map(f).collect())
    }
}

/// A cursor over a stream's bytes; running out is an error.
struct Cursor {
    data: Bytes,
    pos: usize,
}

impl Cursor {
    #[inline]
    fn byte(&mut self) -> Result<u8> {
        let b = *self.data.get(self.pos).ok_or("an integer stream ends early")?;
        self.pos += 1;
        Ok(b)
    }

    /// `n` bytes as a big-endian unsigned integer.
    fn be(&mut self, n: usize) -> Result<u64> {
        let bytes = self.data.get(self.pos..self.pos + n).ok_or("an integer stream ends early")?;
        self.pos += n;
        Ok(bytes.iter().fold(0u64, |acc, &b| (acc << 8) | b as u64))
    }

    fn varint(&mut self) -> Result<u64> {
        let mut v = 0u64;
        let mut shift = 0;
        loop {
            let b = self.byte()?;
            if shift >= 64 {
                return Err("a varint is longer than 64 bits".into());
            }
            v |= ((b & 0x7f) as u64) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
            shift += 7;
        }
    }

    /// `n` values of `width` bits (1..=64), big-endian bit order, appended.
    fn unpack(&mut self, n: usize, width: usize, out: &mut Vec<u64>) -> Result<()> {
        let bytes_needed = (n * width).div_ceil(8);
        let data = self.data.get(self.pos..self.pos + bytes_needed).ok_or("an integer stream ends early")?;
        self.pos += bytes_needed;
        out.reserve(n);
        if width % 8 == 0 {
            let w = width / 8;
            out.extend(data.chunks_exact(w).map(|c| c.iter().fold(0u64, |acc, &b| (acc << 8) | b as u64)));
            return Ok(());
        }
        let mask = if width == 64 { u64::MAX } else { (1u64 << width) - 1 };
        let mut acc: u128 = 0;
        let mut have = 0usize;
        let mut bytes = data.iter();
        for _ in 0..n {
            while have < width {
                acc = (acc << 8) | *bytes.next().expect("sized above") as u128;
                have += 8;
            }
            have -= width;
            out.push((acc >> have) as u64 & mask);
            acc &= (1u128 << have) - 1;
        }
        Ok(())
    }
}

#[inline]
fn unzigzag(v: u64) -> i64 {
    ((v >> 1) as i64) ^ -((v & 1) as i64)
}

/// The 5-bit width code of RLE v2 headers, in bits.
fn width_of(code: u8) -> usize {
    match code {
        0..=23 => code as usize + 1,
        24 => 26,
        25 => 28,
        26 => 30,
        27 => 32,
        28 => 40,
        29 => 48,
        30 => 56,
        _ => 64,
    }
}

/// The smallest width of `width_of`'s table that holds `bits`.
fn closest_fixed_bits(bits: usize) -> usize {
    match bits {
        0 => 1,
        1..=24 => bits,
        25..=26 => 26,
        27..=28 => 28,
        29..=30 => 30,
        31..=32 => 32,
        33..=40 => 40,
        41..=48 => 48,
        49..=56 => 56,
        _ => 64,
    }
}

/// Integer run-length encoding, version 2.
struct RleV2 {
    src: Cursor,
    signed: bool,
    /// The decoded run being handed out, and how far.
    run: Vec<i64>,
    at: usize,
    scratch: Vec<u64>,
}

impl RleV2 {
    fn new(data: Bytes, signed: bool) -> RleV2 {
        RleV2 { src: Cursor { data, pos: 0 }, signed, run: Vec::with_capacity(512), at: 0, scratch: Vec::new() }
    }

    /// Appends the next `n` values to `out`.
    fn read(&mut self, mut n: usize, out: &mut Vec<i64>) -> Result<()> {
        // A corrupt count must not allocate before the data runs out.
        out.reserve(n.min(1 << 20));
        while n > 0 {
            if self.at == self.run.len() {
                self.next_run()?;
            }
            let take = n.min(self.run.len() - self.at);
            out.extend_from_slice(&self.run[self.at..self.at + take]);
            self.at += take;
            n -= take;
        }
        Ok(())
    }

    fn sign(&self, v: u64) -> i64 {
        if self.signed {
            unzigzag(v)
        } else {
            v as i64
        }
    }

    fn next_run(&mut self) -> Result<()> {
        self.run.clear();
        self.at = 0;
        let h = self.src.byte()?;
        match h >> 6 {
            0 => {
                // Short repeat: 3..=10 copies of one value of 1..=8 bytes.
                let width = ((h >> 3) & 7) as usize + 1;
                let count = (h & 7) as usize + 3;
                let raw = self.src.be(width)?;
                let v = self.sign(raw);
                self.run.resize(count, v);
            }
            1 => {
                let width = width_of((h >> 1) & 0x1f);
                let len = (((h & 1) as usize) << 8 | self.src.byte()? as usize) + 1;
                let mut s = std::mem::take(&mut self.scratch);
                s.clear();
                self.src.unpack(len, width, &mut s)?;
                let signed = self.signed;
                self.run.extend(s.iter().map(|&v| if signed { unzigzag(v) } else { v as i64 }));
                self.scratch = s;
            }
            2 => self.patched_base(h)?,
            _ => {
                // Delta: a base, a signed first delta, then |deltas| of a
                // fixed width with the first delta's sign (or all equal to
                // the first delta when the width is 0).
                let code = (h >> 1) & 0x1f;
                let width = if code == 0 { 0 } else { width_of(code) };
                let len = (((h & 1) as usize) << 8 | self.src.byte()? as usize) + 1;
                let base = self.src.varint()?;
                let base = if self.signed { unzigzag(base) } else { base as i64 };
                let delta = unzigzag(self.src.varint()?);
                self.run.push(base);
                if len == 1 {
                    return Ok(());
                }
                if width == 0 {
                    let mut v = base;
                    for _ in 1..len {
                        v = v.wrapping_add(delta);
                        self.run.push(v);
                    }
                } else {
                    let mut v = base.wrapping_add(delta);
                    self.run.push(v);
                    let mut s = std::mem::take(&mut self.scratch);
                    s.clear();
                    self.src.unpack(len - 2, width, &mut s)?;
                    for &d in &s {
                        v = if delta < 0 { v.wrapping_sub(d as i64) } else { v.wrapping_add(d as i64) };
                        self.run.push(v);
                    }
                    self.scratch = s;
                }
            }
        }
        Ok(())
    }

    /// Patched base: values relative to a base, of a width that fits most
    /// of them, with the high bits of the outliers patched in from a list
    /// of (gap, patch) entries.
    fn patched_base(&mut self, h: u8) -> Result<()> {
        let width = width_of((h >> 1) & 0x1f);
        let len = (((h & 1) as usize) << 8 | self.src.byte()? as usize) + 1;
        let b2 = self.src.byte()?;
        let b3 = self.src.byte()?;
        let base_bytes = (b2 >> 5) as usize + 1;
        let patch_width = width_of(b2 & 0x1f);
        let gap_width = (b3 >> 5) as usize + 1;
        let patches = (b3 & 0x1f) as usize;
        let raw_base = self.src.be(base_bytes)?;
        let sign_bit = 1u64 << (base_bytes * 8 - 1);
        if !self.signed && raw_base & sign_bit != 0 {
            // Writers never make an unsigned base negative, and orc-rust
            // reads one as a large positive value: refused, so that both
            // decoders agree on what a stream holds.
            return Err("a patched-base run of an unsigned stream has a negative base".into());
        }
        let base = if raw_base & sign_bit != 0 { -((raw_base & !sign_bit) as i64) } else { raw_base as i64 };
        let mut values = std::mem::take(&mut self.scratch);
        values.clear();
        self.src.unpack(len, width, &mut values)?;
        let entry_width = closest_fixed_bits(patch_width + gap_width);
        if patch_width + gap_width > 64 {
            return Err(format!("a patched-base run has patch width {patch_width} and gap width {gap_width}"));
        }
        let mut list = Vec::with_capacity(patches);
        self.src.unpack(patches, entry_width, &mut list)?;
        let patch_mask = (1u64 << patch_width) - 1;
        let mut pos = 0usize;
        for &e in &list {
            pos += (e >> patch_width) as usize;
            let patch = e & patch_mask;
            if patch == 0 {
                // A gap of 255 with no patch only moves the position on.
                continue;
            }
            let v = values.get_mut(pos).ok_or("a patch points past its run")?;
            *v |= patch.checked_shl(width as u32).ok_or("a patch is shifted past 64 bits")?;
        }
        self.run.extend(values.iter().map(|&v| base.wrapping_add(v as i64)));
        self.scratch = values;
        Ok(())
    }
}

/// Booleans: a byte run-length encoding of bit-packed bytes, most
/// significant bit first (PRESENT streams).
struct BoolRle {
    src: Cursor,
    /// The current byte run: repeated or literal bytes.
    bytes: Vec<u8>,
    at_bit: usize,
}

impl BoolRle {
    fn new(data: Bytes) -> BoolRle {
        BoolRle { src: Cursor { data, pos: 0 }, bytes: Vec::new(), at_bit: 0 }
    }

    fn read(&mut self, n: usize) -> Result<Vec<bool>> {
        let mut out = Vec::with_capacity(n.min(1 << 20));
        while out.len() < n {
            if self.at_bit == self.bytes.len() * 8 {
                self.next_run()?;
            }
            let byte = self.bytes[self.at_bit / 8];
            out.push(byte & (0x80 >> (self.at_bit % 8)) != 0);
            self.at_bit += 1;
        }
        Ok(out)
    }

    fn next_run(&mut self) -> Result<()> {
        self.bytes.clear();
        self.at_bit = 0;
        let h = self.src.byte()? as i8;
        if h >= 0 {
            let b = self.src.byte()?;
            self.bytes.resize(h as usize + 3, b);
        } else {
            for _ in 0..(-(h as i32)) {
                let b = self.src.byte()?;
                self.bytes.push(b);
            }
        }
        Ok(())
    }
}

/// Runs the decoders on arbitrary bytes for the fuzz target
/// `orc_decoders`: the first byte picks the decoder (and, for inflate, the
/// codec), the rest is its stream. Returns how many values came out before
/// the stream ended or was refused; must never panic.
pub(crate) fn fuzz(data: &[u8]) -> usize {
    let Some((&pick, rest)) = data.split_first() else { return 0 };
    let bytes = Bytes::copy_from_slice(rest);
    let mut out = Vec::new();
    let mut n = 0;
    match pick % 8 {
        0 | 1 => {
            let mut d = RleV2::new(bytes, pick % 8 == 1);
            while n < 1 << 16 && d.read(97, &mut out).is_ok() {
                n += 97;
                out.clear();
            }
        }
        2 => {
            let mut d = RleV1::new(bytes);
            while n < 1 << 16 && d.read(61, &mut out).is_ok() {
                n += 61;
                out.clear();
            }
        }
        3 => {
            let mut d = BoolRle::new(bytes);
            while n < 1 << 16 && d.read(77).is_ok() {
                n += 77;
            }
        }
        k => {
            use crate::orc_guard::Codec;
            let codec = [Codec::Zstd, Codec::Zlib, Codec::Snappy, Codec::Lz4, Codec::Lzo][(k - 4) as usize % 5];
            let codec = if pick >= 128 { Codec::Lzo } else { codec };
            let mut budget = 1 << 22;
            let c = Compression { codec, block: 1 << 16 };
            n = crate::orc_guard::inflate(&bytes, Some(c), &mut budget).map_or(0, |b| b.len());
        }
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ints(bytes: &[u8], signed: bool, n: usize) -> Vec<i64> {
        let mut d = RleV2::new(Bytes::copy_from_slice(bytes), signed);
        let mut out = Vec::new();
        d.read(n, &mut out).unwrap();
        out
    }

    // The worked examples of the ORC v1 specification, "Integer Run Length
    // Encoding, version 2".
    #[test]
    fn spec_short_repeat() {
        assert_eq!(ints(&[0x0a, 0x27, 0x10], false, 5), vec![10000; 5]);
    }

    #[test]
    fn spec_direct() {
        assert_eq!(
            ints(&[0x5e, 0x03, 0x5c, 0xa1, 0xab, 0x1e, 0xde, 0xad, 0xbe, 0xef], false, 4),
            vec![23713, 43806, 57005, 48879]
        );
    }

    #[test]
    fn spec_patched_base() {
        let bytes = [
            0x8e, 0x13, 0x2b, 0x21, 0x07, 0xd0, 0x1e, 0x00, 0x14, 0x70, 0x28, 0x32, 0x3c, 0x46, 0x50, 0x5a, 0x64, 0x6e,
            0x78, 0x82, 0x8c, 0x96, 0xa0, 0xaa, 0xb4, 0xbe, 0xfc, 0xe8,
        ];
        let want = vec![
            2030, 2000, 2020, 1000000, 2040, 2050, 2060, 2070, 2080, 2090, 2100, 2110, 2120, 2130, 2140, 2150, 2160,
            2170, 2180, 2190,
        ];
        assert_eq!(ints(&bytes, false, 20), want);
    }

    #[test]
    fn spec_delta() {
        assert_eq!(
            ints(&[0xc6, 0x09, 0x02, 0x02, 0x22, 0x42, 0x42, 0x46], false, 10),
            vec![2, 3, 5, 7, 11, 13, 17, 19, 23, 29]
        );
    }

    #[test]
    fn rle_v1_runs_and_literals() {
        // The specification's examples: a run of 100 sevens, then the
        // literal list [2, 3, 4, 7, 11] after a run of 1..=5 (delta 1),
        // read across calls.
        let mut d = RleV1::new(Bytes::copy_from_slice(&[0x61, 0x00, 0x07, 0x02, 0x01, 0x01, 0xfb, 2, 3, 4, 7, 11]));
        let mut out = Vec::new();
        d.read(60, &mut out).unwrap();
        d.read(50, &mut out).unwrap();
        assert_eq!(&out[..100], &[7; 100][..]);
        assert_eq!(&out[100..], &[1, 2, 3, 4, 5, 2, 3, 4, 7, 11][..]);
        assert!(d.read(1, &mut out).is_err());
    }

    #[test]
    fn corrupt_streams_are_errors() {
        let mut d = RleV2::new(Bytes::copy_from_slice(&[0x5e, 0x03, 0x5c]), false);
        assert!(d.read(4, &mut Vec::new()).is_err());
        let mut d = RleV2::new(Bytes::new(), true);
        assert!(d.read(1, &mut Vec::new()).is_err());
        let mut b = BoolRle::new(Bytes::copy_from_slice(&[0xfe, 0x01]));
        assert!(b.read(16).is_err());
    }

    #[test]
    fn bools_and_spread() {
        // A run of 3 bytes 0xff, then the literal 0b1010_0000.
        let mut b = BoolRle::new(Bytes::copy_from_slice(&[0x00, 0xff, 0xff, 0xa0]));
        let bits = b.read(27).unwrap();
        assert!(bits[..24].iter().all(|&x| x));
        assert_eq!(&bits[24..], &[true, false, true]);
        assert_eq!(spread(vec![1, 2], Some(&[false, true, false, true]), 0), vec![0, 1, 0, 2]);
    }
}
