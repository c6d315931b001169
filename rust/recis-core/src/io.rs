//! ORC reading for training: files are cut into units (one stripe each),
//! units are shuffled (seeded, per epoch) and sharded across workers, decoded
//! on a pool of threads with a bounded prefetch window, and delivered in plan
//! order as batches of contiguous buffers (values, and offsets for list
//! columns). String columns can be hashed to int64 ids while they are read.
//!
//! Position: a reader's cursor is (unit, row): the next unread row. Starting a
//! reader at a cursor resumes at exactly that row, so the samples seen across
//! restarts are those of one uninterrupted run.
//!
//! Decoding: integer, float and list-of-those columns go through our own
//! decoder (`orc_decode`, on slices of the memory-mapped file); the other
//! kinds through the `orc-rust` crate (Arrow arrays), converted here to plain
//! buffers. Nulls read as fill values: 0 for integers and booleans, NaN for
//! floats, the empty string for strings (which then hashes as ""), and an
//! empty list for a null list.

pub use crate::column::{Column, Values};
use crate::features::fingerprint64;
use crate::orc_decode;
use crate::orc_guard;
pub use crate::orc_guard::Limits;
use arrow::array::{Array, ArrayRef, AsArray, RecordBatch};
use arrow::datatypes::{DataType, Float32Type, Float64Type, Int16Type, Int32Type, Int64Type, Int8Type};
use bytes::Buf;
use orc_rust::projection::ProjectionMask;
use orc_rust::reader::ChunkReader;
use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::fs::File;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

/// What went wrong in a read: the data (a file that cannot be opened, is
/// malformed, lacks a column or holds another type: the message names the
/// file, and the stripe and column where known), or the caller's arguments.
#[derive(Debug, Clone, PartialEq)]
pub enum IoError {
    Data(String),
    Usage(String),
}

impl IoError {
    pub fn message(&self) -> &str {
        match self {
            IoError::Data(m) | IoError::Usage(m) => m,
        }
    }
}

impl fmt::Display for IoError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.message())
    }
}

impl std::error::Error for IoError {}

type Result<T> = std::result::Result<T, IoError>;

/// A decoded unit: its rows from the cursor on, in chunks.
type Decoded = Result<VecDeque<Chunk>>;

fn err<T>(msg: impl Into<String>) -> Result<T> {
    Err(IoError::Data(msg.into()))
}

fn usage<T>(msg: impl Into<String>) -> Result<T> {
    Err(IoError::Usage(msg.into()))
}

/// The message of a caught panic.
pub fn panic_message(panic: &(dyn std::any::Any + Send)) -> &str {
    panic
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| panic.downcast_ref::<&str>().copied())
        .unwrap_or("unknown failure")
}

/// Decoding threads a reader may start.
pub const MAX_THREADS: usize = 256;

/// The element type of a column, as read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Element {
    /// Integers and booleans, as int64.
    Int,
    Float32,
    Float64,
    /// Strings, raw (bytes + offsets) or hashed to int64 ids.
    String,
}

/// What the reader knows of a column: its element type and whether each row
/// holds a list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ColumnType {
    pub element: Element,
    pub list: bool,
}

impl fmt::Display for ColumnType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let e = match self.element {
            Element::Int => "int",
            Element::Float32 => "float",
            Element::Float64 => "double",
            Element::String => "string",
        };
        if self.list {
            write!(f, "list<{e}>")
        } else {
            f.write_str(e)
        }
    }
}

fn element_of(dt: &DataType) -> Option<Element> {
    Some(match dt {
        DataType::Boolean | DataType::Int8 | DataType::Int16 | DataType::Int32 | DataType::Int64 => Element::Int,
        DataType::Float32 => Element::Float32,
        DataType::Float64 => Element::Float64,
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Binary | DataType::LargeBinary => Element::String,
        _ => return None,
    })
}

fn column_type_of(dt: &DataType) -> Option<ColumnType> {
    match dt {
        DataType::List(f) | DataType::LargeList(f) => {
            element_of(f.data_type()).map(|element| ColumnType { element, list: true })
        }
        other => element_of(other).map(|element| ColumnType { element, list: false }),
    }
}

/// A column to read.
#[derive(Debug, Clone, PartialEq)]
pub struct ColumnRequest {
    pub name: String,
    /// Hash string values to int64 ids (FarmHash `fingerprint64`).
    pub hash: bool,
    /// With `hash`: `fingerprint % bucket` on the unsigned value (0: none).
    pub bucket: u64,
}

/// Consecutive rows of a unit, decoded.
#[derive(Debug, Clone)]
pub struct Chunk {
    pub columns: Vec<Column>,
    pub rows: usize,
}

/// A stripe of one file: the unit of decoding, sharding and shuffling.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unit {
    pub file: usize,
    pub stripe: usize,
    pub offset: u64,
    pub rows: u64,
    /// Rows of its file before it (to name a row of a batch by its file
    /// and row in errors).
    pub file_row: u64,
}

/// A file's tail, checked once when its dataset is opened and shared by
/// every read of its stripes (a file of many small stripes would otherwise
/// have its tail parsed again for each).
#[derive(Debug)]
struct Opened {
    len: u64,
    tail: orc_guard::Tail,
    meta: Arc<orc_rust::reader::metadata::FileMetadata>,
}

/// Maps a file and checks its tail (`orc_guard::read_tail`) before orc-rust
/// parses it (under `catch_unwind`: a panic in it is an error naming the
/// file).
fn open_checked(path: &std::path::Path, limits: &Limits) -> Result<(MappedFile, Opened)> {
    let mut file =
        MappedFile::open(path).map_err(|e| IoError::Data(format!("{}: cannot open: {e}", path.display())))?;
    let bad = |e: &dyn fmt::Display| IoError::Data(format!("{}: not a readable ORC file: {e}", path.display()));
    let tail = orc_guard::read_tail(&file.0, limits).map_err(|e| bad(&e))?;
    let meta =
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| orc_rust::reader::metadata::read_metadata(&mut file)))
            .map_err(|p| bad(&format!("the ORC reader failed ({})", panic_message(&*p))))?
            .map_err(|e| bad(&e))?;
    let len = file.len();
    Ok((file, Opened { len, tail, meta: Arc::new(meta) }))
}

/// The files of a dataset with their stripes and the columns' types, checked
/// to agree across files.
#[derive(Debug, Clone)]
pub struct Source {
    pub files: Vec<PathBuf>,
    pub columns: Vec<ColumnRequest>,
    pub types: Vec<ColumnType>,
    /// Every stripe of every file, in file order (zero-row files have none).
    pub units: Vec<Unit>,
    /// What a file may make a read allocate.
    pub limits: Limits,
    /// Each file's checked tail, by file index.
    opened: Vec<Option<Arc<Opened>>>,
}

impl Source {
    pub fn open(files: &[PathBuf], columns: &[ColumnRequest]) -> Result<Source> {
        Source::open_with_limits(files, columns, Limits::default())
    }

    /// Opens the files, checking each one's tail (`orc_guard::read_tail`)
    /// before orc-rust reads its schema.
    pub fn open_with_limits(files: &[PathBuf], columns: &[ColumnRequest], limits: Limits) -> Result<Source> {
        if files.is_empty() {
            return usage("no ORC files to read");
        }
        if columns.is_empty() {
            return usage("no columns requested");
        }
        let mut types: Vec<Option<(ColumnType, usize)>> = vec![None; columns.len()];
        let mut units = Vec::new();
        let mut opened = Vec::with_capacity(files.len());
        for (fi, path) in files.iter().enumerate() {
            let (_, file) = open_checked(path, &limits)?;
            let meta = file.meta.clone();
            if meta.number_of_rows() == 0 {
                opened.push(None);
                continue;
            }
            opened.push(Some(Arc::new(file)));
            let schema = arrow_schema(&meta, &ProjectionMask::all());
            for (ci, c) in columns.iter().enumerate() {
                let field = schema.field_with_name(&c.name).map_err(|_| {
                    let names: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
                    IoError::Data(format!("{}: column {:?} not found (columns: {names:?})", path.display(), c.name))
                })?;
                let ty = column_type_of(field.data_type()).ok_or_else(|| {
                    IoError::Data(format!(
                        "{}: column {:?} has type {} which RecIS cannot read (ints, floats, booleans, strings and lists of them)",
                        path.display(),
                        c.name,
                        field.data_type()
                    ))
                })?;
                if c.hash && ty.element != Element::String {
                    return err(format!(
                        "{}: column {:?} is {ty}, but hashing was asked for (strings only)",
                        path.display(),
                        c.name
                    ));
                }
                match types[ci] {
                    None => types[ci] = Some((ty, fi)),
                    Some((t, first)) if t != ty => {
                        return err(format!(
                            "{}: column {:?} is {ty} but {t} in {}",
                            path.display(),
                            c.name,
                            files[first].display()
                        ))
                    }
                    _ => {}
                }
            }
            let mut file_row = 0u64;
            for (si, s) in meta.stripe_metadatas().iter().enumerate() {
                if s.number_of_rows() > 0 {
                    units.push(Unit { file: fi, stripe: si, offset: s.offset(), rows: s.number_of_rows(), file_row });
                }
                file_row += s.number_of_rows();
            }
        }
        let types = match types.into_iter().collect::<Option<Vec<_>>>() {
            Some(t) => t.into_iter().map(|(t, _)| t).collect(),
            None => return err("every ORC file is empty: there are no rows to read"),
        };
        Ok(Source { files: files.to_vec(), columns: columns.to_vec(), types, units, limits, opened })
    }

    pub fn total_rows(&self) -> u64 {
        self.units.iter().map(|u| u.rows).sum()
    }

    /// Decodes rows `skip..` of a unit into chunks of rows: the first of
    /// `first` rows, then `chunk` rows each (the last may be shorter), each a
    /// column per request. Aligning chunks to the batch grid lets the reader
    /// hand whole chunks out as batches without copying them again. A panic
    /// inside the ORC decoder (it has some on corrupt streams) becomes an
    /// error naming the file and stripe.
    pub fn decode(&self, unit: &Unit, skip: u64, first: usize, chunk: usize) -> Result<Vec<Chunk>> {
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.decode_unguarded(unit, skip, first, chunk)))
        {
            Ok(r) => r,
            Err(panic) => {
                let msg = panic_message(&*panic);
                err(format!(
                    "{} (stripe {}): the ORC decoder failed ({msg}); the file is corrupt",
                    self.files[unit.file].display(),
                    unit.stripe
                ))
            }
        }
    }

    fn decode_unguarded(&self, unit: &Unit, skip: u64, first: usize, chunk: usize) -> Result<Vec<Chunk>> {
        let path = &self.files[unit.file];
        let ctx = |e: &dyn fmt::Display| IoError::Data(format!("{} (stripe {}): {e}", path.display(), unit.stripe));
        let opened = self.opened.get(unit.file).and_then(Option::as_ref).ok_or_else(|| ctx(&"no such unit"))?;
        let file = MappedFile::open(path).map_err(|e| ctx(&e))?;
        if file.len() != opened.len {
            return Err(ctx(&format!(
                "the file is {} bytes, {} when it was opened; it changed since",
                file.len(),
                opened.len
            )));
        }
        let (tail, meta) = (&opened.tail, &opened.meta);
        let stripe = meta
            .stripe_metadatas()
            .get(unit.stripe)
            .filter(|s| s.offset() == unit.offset && s.number_of_rows() == unit.rows)
            .ok_or_else(|| ctx(&"no stripe starts where the plan says; the file changed since it was opened"))?;
        let footer = orc_guard::check_stripe(&file.0, tail, unit.stripe, &self.limits).map_err(|e| ctx(&e))?;
        let mut budget = self.limits.max_stripe_bytes;
        // Bytes the requested columns decoded to so far (max_decoded_bytes).
        let mut decoded = 0u64;
        // Names a column index (a requested column or a part of one) in errors.
        let roots = meta.root_data_type().children();
        let label = |id: u32| match roots.iter().find(|c| c.data_type().all_indices().contains(&(id as usize))) {
            Some(c) => format!("column {:?}", c.name()),
            None => format!("column {id}"),
        };
        // Columns our decoder takes in this stripe, and the rest.
        let mut fast = Vec::new();
        let mut slow = Vec::new();
        for (i, (req, ty)) in self.columns.iter().zip(&self.types).enumerate() {
            let dt = meta.root_data_type().children().iter().find(|c| c.name() == req.name).map(|c| c.data_type());
            let kind = dt.and_then(|dt| orc_decode::fast_kind(dt, &footer));
            let element = match kind.map(|k| k.0) {
                Some(orc_decode::Leaf::Int) => Some(Element::Int),
                Some(orc_decode::Leaf::Float32) => Some(Element::Float32),
                Some(orc_decode::Leaf::Float64) => Some(Element::Float64),
                None => None,
            };
            match (dt, kind) {
                (Some(dt), Some((leaf, list))) if element == Some(ty.element) && list == ty.list && !req.hash => {
                    fast.push((i, dt.clone(), leaf))
                }
                _ => slow.push(i),
            }
        }
        // The chunks' sizes: `first` rows, then `chunk` each.
        let mut left = unit.rows.saturating_sub(skip) as usize;
        let mut want = first.max(1);
        let sizes = std::iter::from_fn(|| {
            let n = want.min(left);
            left -= n;
            want = chunk.max(1);
            (n > 0).then_some(n)
        });
        let mem = file.0.clone();
        let ids_of = |dt: &orc_rust::schema::DataType| dt.all_indices();
        let mut slow_chunks = if slow.is_empty() {
            None
        } else {
            let ids: Vec<usize> = slow
                .iter()
                .filter_map(|&i| {
                    let name = &self.columns[i].name;
                    meta.root_data_type().children().iter().find(|c| c.name() == name)
                })
                .flat_map(|c| ids_of(c.data_type()))
                .collect();
            orc_guard::check_inflated(&mem, stripe.offset(), &footer, &ids, tail.compression, &mut budget, &label)
                .map_err(|e| ctx(&e))?;
            // orc-rust sizes a list's buffers by its lengths, and copies a
            // dictionary's strings into every row: check both first.
            let batch = chunk.max(1) as u64;
            let row_batches: Vec<u64> =
                (0..unit.rows.div_ceil(batch)).map(|k| batch.min(unit.rows - k * batch)).collect();
            for &i in &slow {
                use orc_rust::schema::DataType as T;
                let name = &self.columns[i].name;
                let in_ctx = |e: String| ctx(&format!("column {name:?}: {e}"));
                let Some(dt) =
                    meta.root_data_type().children().iter().find(|c| c.name() == name).map(|c| c.data_type())
                else {
                    continue;
                };
                let streams = |id: usize, kinds: &[orc_rust::proto::stream::Kind]| {
                    let mut b = self.limits.max_stripe_bytes;
                    orc_decode::Streams::select(
                        &mem,
                        stripe.offset(),
                        &footer,
                        &[id],
                        Some(kinds),
                        tail.compression,
                        &mut b,
                        &label,
                    )
                };
                use orc_rust::proto::stream::Kind as K;
                let is_string =
                    |d: &T| matches!(d, T::String { .. } | T::Varchar { .. } | T::Char { .. } | T::Binary { .. });
                let dictionary = |id: usize| {
                    matches!(
                        footer.columns.get(id).map(|c| c.kind()),
                        Some(
                            orc_rust::proto::column_encoding::Kind::DictionaryV2
                                | orc_rust::proto::column_encoding::Kind::Dictionary
                        )
                    )
                };
                match dt {
                    T::List { child, .. } => {
                        let id = dt.column_index();
                        let totals = orc_decode::check_list_batches(
                            id,
                            &footer,
                            &streams(id, &[K::Present, K::Length]).map_err(in_ctx)?,
                            unit.rows,
                            chunk.max(1),
                            self.limits.max_list_elements,
                        )
                        .map_err(in_ctx)?;
                        let cid = child.column_index();
                        if is_string(child) && dictionary(cid) {
                            orc_decode::check_string_batches(
                                cid,
                                &footer,
                                &|kinds| streams(cid, kinds),
                                &totals,
                                self.limits.max_decoded_bytes,
                            )
                            .map_err(in_ctx)?;
                        }
                    }
                    d if is_string(d) && dictionary(d.column_index()) => {
                        let id = d.column_index();
                        orc_decode::check_string_batches(
                            id,
                            &footer,
                            &|kinds| streams(id, kinds),
                            &row_batches,
                            self.limits.max_decoded_bytes,
                        )
                        .map_err(in_ctx)?;
                    }
                    _ => {}
                }
            }
            Some(
                self.decode_orc_rust(file.clone(), meta, stripe, &slow, skip, first, chunk, &mut decoded)
                    .map_err(|e| ctx(&e))?
                    .into_iter(),
            )
        };
        let mut decoders = Vec::new();
        if !fast.is_empty() {
            let ids: Vec<usize> = fast
                .iter()
                .flat_map(|(_, dt, _)| std::iter::once(dt.column_index()).chain(dt.children_indices()))
                .collect();
            let streams =
                orc_decode::Streams::new(&mem, stripe.offset(), &footer, &ids, tail.compression, &mut budget, &label)
                    .map_err(|e| ctx(&e))?;
            for (i, dt, leaf) in &fast {
                let name = &self.columns[*i].name;
                let d = orc_decode::ColumnDecoder::new(dt, *leaf, &streams, self.limits.max_list_elements)
                    .map_err(|e| ctx(&format!("column {name:?}: {e}")))?;
                decoders.push((*i, d));
            }
            // Skipped in batches, so that a batch's limits apply as to a read.
            let mut left = skip as usize;
            while left > 0 {
                let n = left.min(chunk.max(1));
                for (i, d) in &mut decoders {
                    d.read(n).map_err(|e| ctx(&format!("column {:?}: {e}", self.columns[*i].name)))?;
                }
                left -= n;
            }
        }
        let mut chunks = Vec::new();
        for rows in sizes {
            let mut columns: Vec<Option<Column>> = vec![None; self.columns.len()];
            if let Some(it) = &mut slow_chunks {
                let c = it
                    .next()
                    .filter(|c| c.rows == rows)
                    .ok_or_else(|| ctx(&format!("stripe holds fewer rows than its footer's {}", unit.rows)))?;
                for (&i, col) in slow.iter().zip(c.columns) {
                    columns[i] = Some(col);
                }
            }
            for (i, d) in &mut decoders {
                let name = &self.columns[*i].name;
                let col = d.read(rows).map_err(|e| ctx(&format!("column {name:?}: {e}")))?;
                self.charge(&mut decoded, std::slice::from_ref(&col))
                    .map_err(|e| ctx(&format!("column {name:?}: {e}")))?;
                columns[*i] = Some(col);
            }
            chunks
                .push(Chunk { columns: columns.into_iter().map(|c| c.expect("every column decoded")).collect(), rows });
        }
        Ok(chunks)
    }

    /// Columns `cols` of rows `skip..` of a unit through `orc-rust`, in the
    /// chunks of [`Source::decode`].
    #[allow(clippy::too_many_arguments)]
    fn decode_orc_rust(
        &self,
        mut file: MappedFile,
        meta: &orc_rust::reader::metadata::FileMetadata,
        stripe: &orc_rust::stripe::StripeMetadata,
        cols: &[usize],
        skip: u64,
        first: usize,
        chunk: usize,
        decoded: &mut u64,
    ) -> std::result::Result<Vec<Chunk>, String> {
        let names: Vec<&str> = cols.iter().map(|&i| self.columns[i].name.as_str()).collect();
        let mask = ProjectionMask::named_roots(meta.root_data_type(), &names);
        let projected = meta.root_data_type().project(&mask);
        let schema = arrow_schema(meta, &mask);
        let stripe = orc_rust::stripe::Stripe::new(&mut file, meta, &projected, stripe).map_err(|e| e.to_string())?;
        let stripe_rows = stripe.number_of_rows();
        let reader = orc_rust::array_decoder::NaiveStripeDecoder::new(stripe, schema, chunk.max(1))
            .map_err(|e| format!("column(s) {names:?}: {e}"))?;
        let mut chunks: Vec<Chunk> = Vec::new();
        // Rows still to put in the chunk being filled, and whether it is open.
        let mut want = first.max(1);
        let mut open = false;
        let mut seen = 0u64;
        for batch in reader {
            let batch = batch.map_err(|e| format!("column(s) {names:?}: {e}"))?;
            let n = batch.num_rows();
            let mut at = skip.saturating_sub(seen).min(n as u64) as usize;
            seen += n as u64;
            while at < n {
                let take = want.min(n - at);
                let part = self.convert(&batch.slice(at, take), cols)?;
                self.charge(decoded, &part).map_err(|e| format!("column(s) {names:?}: {e}"))?;
                if open {
                    let last = chunks.last_mut().unwrap();
                    for (a, p) in last.columns.iter_mut().zip(&part) {
                        a.extend_rows(p, 0, take);
                    }
                    last.rows += take;
                } else {
                    chunks.push(Chunk { columns: part, rows: take });
                }
                at += take;
                want -= take;
                open = want > 0;
                if !open {
                    want = chunk.max(1);
                }
            }
        }
        if seen != stripe_rows as u64 {
            return Err(format!("stripe holds {seen} rows, its footer says {stripe_rows}"));
        }
        Ok(chunks)
    }

    /// Charges decoded columns to a stripe's `max_decoded_bytes`.
    fn charge(&self, decoded: &mut u64, columns: &[Column]) -> std::result::Result<(), String> {
        let bytes: u64 = columns.iter().map(Column::nbytes).sum();
        *decoded = decoded.saturating_add(bytes);
        if *decoded > self.limits.max_decoded_bytes {
            return Err(format!(
                "the stripe decodes to more than {} bytes (the max_decoded_bytes limit)",
                self.limits.max_decoded_bytes
            ));
        }
        Ok(())
    }

    fn convert(&self, batch: &RecordBatch, cols: &[usize]) -> std::result::Result<Vec<Column>, String> {
        cols.iter()
            .map(|&i| {
                let (req, ty) = (&self.columns[i], self.types[i]);
                let array = batch.column_by_name(&req.name).ok_or_else(|| format!("column {:?} missing", req.name))?;
                convert_column(array, ty, req).map_err(|e| format!("column {:?}: {e}", req.name))
            })
            .collect()
    }
}

fn convert_column(array: &ArrayRef, ty: ColumnType, req: &ColumnRequest) -> std::result::Result<Column, String> {
    if !ty.list {
        return Ok(Column { values: convert_values(array.as_ref(), ty.element, req)?, offsets: None });
    }
    let (offsets, values, nulls): (Vec<i64>, ArrayRef, Option<&arrow::buffer::NullBuffer>) = match array.data_type() {
        DataType::List(_) => {
            let l = array.as_list::<i32>();
            let o = l.value_offsets();
            let offsets: Vec<i64> = o.iter().map(|&x| (x - o[0]) as i64).collect();
            let values = l.values().slice(o[0] as usize, (o[o.len() - 1] - o[0]) as usize);
            (offsets, values, l.nulls())
        }
        DataType::LargeList(_) => {
            let l = array.as_list::<i64>();
            let o = l.value_offsets();
            let offsets: Vec<i64> = o.iter().map(|&x| x - o[0]).collect();
            let values = l.values().slice(o[0] as usize, (o[o.len() - 1] - o[0]) as usize);
            (offsets, values, l.nulls())
        }
        other => return Err(format!("expected a list, found {other}")),
    };
    let values = convert_values(values.as_ref(), ty.element, req)?;
    Ok(drop_null_lists(Column { values, offsets: Some(offsets) }, nulls))
}

/// A null list reads as an empty list. Arrow lets a null list span elements;
/// when one does, the column is rebuilt without them.
fn drop_null_lists(col: Column, nulls: Option<&arrow::buffer::NullBuffer>) -> Column {
    let Some(nulls) = nulls else { return col };
    let offsets = col.offsets.as_ref().expect("list column");
    let rows = offsets.len() - 1;
    if !(0..rows).any(|i| nulls.is_null(i) && offsets[i + 1] > offsets[i]) {
        return col;
    }
    let mut out = col.empty_like();
    for i in 0..rows {
        if nulls.is_null(i) {
            let o = out.offsets.as_mut().unwrap();
            o.push(*o.last().unwrap());
        } else {
            out.extend_rows(&col, i, i + 1);
        }
    }
    out
}

fn convert_values(a: &dyn Array, element: Element, req: &ColumnRequest) -> std::result::Result<Values, String> {
    let n = a.len();
    Ok(match (element, a.data_type()) {
        (Element::Int, DataType::Boolean) => {
            let b = a.as_boolean();
            Values::Int((0..n).map(|i| (b.is_valid(i) && b.value(i)) as i64).collect())
        }
        (Element::Int, DataType::Int8) => Values::Int(ints(a.as_primitive::<Int8Type>())),
        (Element::Int, DataType::Int16) => Values::Int(ints(a.as_primitive::<Int16Type>())),
        (Element::Int, DataType::Int32) => Values::Int(ints(a.as_primitive::<Int32Type>())),
        (Element::Int, DataType::Int64) => Values::Int(ints(a.as_primitive::<Int64Type>())),
        (Element::Float32, DataType::Float32) => Values::Float32(floats(a.as_primitive::<Float32Type>(), f32::NAN)),
        (Element::Float64, DataType::Float64) => Values::Float64(floats(a.as_primitive::<Float64Type>(), f64::NAN)),
        (Element::String, dt) => {
            let (data, offsets): (&[u8], Vec<i64>) = match dt {
                DataType::Utf8 => {
                    let s = a.as_string::<i32>();
                    (s.value_data(), s.value_offsets().iter().map(|&x| x as i64).collect())
                }
                DataType::LargeUtf8 => {
                    let s = a.as_string::<i64>();
                    (s.value_data(), s.value_offsets().to_vec())
                }
                DataType::Binary => {
                    let s = a.as_binary::<i32>();
                    (s.value_data(), s.value_offsets().iter().map(|&x| x as i64).collect())
                }
                DataType::LargeBinary => {
                    let s = a.as_binary::<i64>();
                    (s.value_data(), s.value_offsets().to_vec())
                }
                other => return Err(format!("expected strings, found {other}")),
            };
            let nulls = a.nulls();
            let get = |i: usize| -> &[u8] {
                if nulls.is_some_and(|nb| nb.is_null(i)) {
                    &[]
                } else {
                    &data[offsets[i] as usize..offsets[i + 1] as usize]
                }
            };
            if req.hash {
                Values::Int(
                    (0..n)
                        .map(|i| {
                            let h = fingerprint64(get(i));
                            if req.bucket > 0 {
                                (h % req.bucket) as i64
                            } else {
                                h as i64
                            }
                        })
                        .collect(),
                )
            } else {
                let mut out = Vec::new();
                let mut offs = Vec::with_capacity(n + 1);
                offs.push(0i64);
                for i in 0..n {
                    out.extend_from_slice(get(i));
                    offs.push(out.len() as i64);
                }
                Values::Bytes { data: out, offsets: offs }
            }
        }
        (e, dt) => return Err(format!("cannot read {dt} as {e:?}")),
    })
}

/// The Arrow schema of the columns `mask` selects, as orc-rust's reader
/// builds it.
fn arrow_schema(meta: &orc_rust::reader::metadata::FileMetadata, mask: &ProjectionMask) -> arrow::datatypes::SchemaRef {
    let custom =
        meta.user_custom_metadata().iter().map(|(k, v)| (k.clone(), String::from_utf8_lossy(v).to_string())).collect();
    Arc::new(meta.root_data_type().project(mask).create_arrow_schema(&custom))
}

/// A file memory-mapped for the decoder: it reads each stream as a slice of
/// the page cache (`get_bytes` below), where orc-rust's `File` reader
/// allocates a zeroed buffer per stream and reads into it.
#[derive(Clone)]
struct MappedFile(bytes::Bytes);

impl MappedFile {
    fn open(path: &std::path::Path) -> std::io::Result<MappedFile> {
        let file = File::open(path)?;
        if file.metadata()?.len() == 0 {
            return Ok(MappedFile(bytes::Bytes::new()));
        }
        // SAFETY: the map is read-only. Like any memory-mapped reader (Arrow's
        // `memory_map`), it needs the file not to shrink while a unit is being
        // decoded; datasets are written before training reads them.
        let map = unsafe { memmap2::Mmap::map(&file)? };
        Ok(MappedFile(bytes::Bytes::from_owner(map)))
    }

    fn range(&self, offset: u64, length: u64) -> std::io::Result<std::ops::Range<usize>> {
        let end = offset.checked_add(length).filter(|&e| e <= self.0.len() as u64).ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!("bytes {offset}..{} are past the end of the file ({} bytes)", offset + length, self.0.len()),
            )
        })?;
        Ok(offset as usize..end as usize)
    }
}

impl ChunkReader for MappedFile {
    type T = bytes::buf::Reader<bytes::Bytes>;

    fn len(&self) -> u64 {
        self.0.len() as u64
    }

    fn get_read(&self, offset_from_start: u64) -> std::io::Result<Self::T> {
        let r = self.range(offset_from_start, 0)?;
        Ok(self.0.slice(r.start..).reader())
    }

    fn get_bytes(&self, offset_from_start: u64, length: u64) -> std::io::Result<bytes::Bytes> {
        Ok(self.0.slice(self.range(offset_from_start, length)?))
    }
}

/// Integers as int64: a bulk conversion of the value buffer, then nulls set
/// to 0 (only when there are any).
fn ints<T: arrow::datatypes::ArrowPrimitiveType>(p: &arrow::array::PrimitiveArray<T>) -> Vec<i64>
where
    T::Native: Into<i64>,
{
    let mut out: Vec<i64> = p.values().iter().map(|&x| x.into()).collect();
    if let Some(nulls) = p.nulls() {
        for i in nulls.iter().enumerate().filter(|(_, valid)| !valid).map(|(i, _)| i) {
            out[i] = 0;
        }
    }
    out
}

/// Floats: a copy of the value buffer, then nulls set to NaN.
fn floats<T: arrow::datatypes::ArrowPrimitiveType>(
    p: &arrow::array::PrimitiveArray<T>,
    nan: T::Native,
) -> Vec<T::Native> {
    let mut out = p.values().to_vec();
    if let Some(nulls) = p.nulls() {
        for i in nulls.iter().enumerate().filter(|(_, valid)| !valid).map(|(i, _)| i) {
            out[i] = nan;
        }
    }
    out
}

/// The order in which a worker reads units in an epoch: all units (shuffled
/// by `seed` and `epoch` when asked), then every `worker_num`-th one from
/// `worker_idx`. Workers' shards are disjoint and together cover every unit.
pub fn plan(units: &[Unit], shuffle: bool, seed: u64, epoch: u64, worker_idx: usize, worker_num: usize) -> Vec<Unit> {
    let mut order: Vec<Unit> = units.to_vec();
    if shuffle {
        // Fisher-Yates with a counter-based generator of (seed, epoch).
        let mut s = crate::hash::IdStream::new(seed, epoch);
        for i in (1..order.len()).rev() {
            let j = (s.next_u64() % (i as u64 + 1)) as usize;
            order.swap(i, j);
        }
    }
    order.into_iter().skip(worker_idx).step_by(worker_num.max(1)).collect()
}

/// A cursor: the next unread row is row `row` of unit `unit` of the plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Cursor {
    pub unit: usize,
    pub row: u64,
}

/// A batch and the cursor just past it.
pub struct Batch {
    pub columns: Vec<Column>,
    pub rows: usize,
    pub end: Cursor,
}

struct Shared {
    stop: AtomicBool,
    /// Units delivered to the consumer (for the prefetch window).
    consumed: Mutex<usize>,
    progress: Condvar,
}

/// Reads one worker's plan for one epoch from a cursor, in batches.
pub struct Reader {
    plan: Arc<Vec<Unit>>,
    batch_size: usize,
    drop_remainder: bool,
    cursor: Cursor,
    /// Decoded units waiting, by plan index.
    ready: BTreeMap<usize, Decoded>,
    /// Chunks of the unit at the cursor not yet handed out.
    pending: VecDeque<Chunk>,
    pending_unit: Option<usize>,
    rx: mpsc::Receiver<(usize, Decoded)>,
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
    failed: bool,
}

impl Reader {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        source: Arc<Source>,
        plan: Vec<Unit>,
        start: Cursor,
        batch_size: usize,
        drop_remainder: bool,
        num_threads: usize,
        prefetch: usize,
    ) -> Result<Reader> {
        if batch_size == 0 {
            return usage("batch_size must be >= 1");
        }
        if start.unit > plan.len() || (start.unit < plan.len() && start.row > plan[start.unit].rows) {
            return usage(format!(
                "cursor (unit {}, row {}) is outside this worker's plan of {} units",
                start.unit,
                start.row,
                plan.len()
            ));
        }
        // Rows between the cursor and the start of each unit: a unit's chunks
        // are cut so that batch boundaries (every `batch_size` rows from the
        // cursor) fall on chunk boundaries.
        let mut before = vec![0u64; plan.len() + 1];
        for i in start.unit..plan.len() {
            let rows = plan[i].rows - if i == start.unit { start.row } else { 0 };
            before[i + 1] = before[i] + rows;
        }
        let before = Arc::new(before);
        let plan = Arc::new(plan);
        let shared = Arc::new(Shared {
            stop: AtomicBool::new(false),
            consumed: Mutex::new(start.unit),
            progress: Condvar::new(),
        });
        let next = Arc::new(AtomicUsize::new(start.unit));
        let (tx, rx) = mpsc::channel();
        if !(1..=MAX_THREADS).contains(&num_threads) {
            return usage(format!("num_threads must be in 1..={MAX_THREADS}, got {num_threads}"));
        }
        let window = prefetch.clamp(1, 1 << 16);
        let mut threads = Vec::with_capacity(num_threads);
        for k in 0..num_threads {
            let spawned = {
                let (source, plan, shared, next, tx, before) = (
                    Arc::clone(&source),
                    Arc::clone(&plan),
                    Arc::clone(&shared),
                    Arc::clone(&next),
                    tx.clone(),
                    Arc::clone(&before),
                );
                std::thread::Builder::new().name(format!("recis-orc-{k}")).spawn(move || loop {
                    let i = next.fetch_add(1, Ordering::AcqRel);
                    if i >= plan.len() {
                        return;
                    }
                    // Stay within `window` units of what the consumer has taken.
                    {
                        let mut consumed = shared.consumed.lock().unwrap_or_else(|e| e.into_inner());
                        while i >= *consumed + window && !shared.stop.load(Ordering::Acquire) {
                            consumed = shared.progress.wait(consumed).unwrap_or_else(|e| e.into_inner());
                        }
                    }
                    if shared.stop.load(Ordering::Acquire) {
                        return;
                    }
                    let skip = if i == start.unit { start.row } else { 0 };
                    let first = batch_size - (before[i] % batch_size as u64) as usize;
                    let out = source.decode(&plan[i], skip, first, batch_size).map(VecDeque::from);
                    let failed = out.is_err();
                    if tx.send((i, out)).is_err() || failed {
                        return;
                    }
                })
            };
            match spawned {
                Ok(t) => threads.push(t),
                Err(e) => {
                    // Stop (and join, in Drop) the threads already started.
                    shared.stop.store(true, Ordering::Release);
                    shared.progress.notify_all();
                    for t in threads {
                        let _ = t.join();
                    }
                    return usage(format!("cannot start ORC decoding thread {k} of {num_threads}: {e}"));
                }
            }
        }
        Ok(Reader {
            plan,
            batch_size,
            drop_remainder,
            cursor: start,
            ready: BTreeMap::new(),
            pending: VecDeque::new(),
            pending_unit: None,
            rx,
            shared,
            threads,
            failed: false,
        })
    }

    /// Makes `pending` hold the chunks of unit `i`, waiting for the decoders.
    fn load(&mut self, i: usize) -> Result<()> {
        if self.pending_unit == Some(i) {
            return Ok(());
        }
        while !self.ready.contains_key(&i) {
            match self.rx.recv() {
                Ok((k, r)) => {
                    self.ready.insert(k, r);
                }
                Err(_) => return err("the ORC decoding threads stopped unexpectedly"),
            }
        }
        self.pending = self.ready.remove(&i).unwrap()?;
        self.pending_unit = Some(i);
        Ok(())
    }

    fn release(&mut self, i: usize) {
        self.pending.clear();
        self.pending_unit = None;
        let mut consumed = self.shared.consumed.lock().unwrap_or_else(|e| e.into_inner());
        *consumed = (*consumed).max(i + 1);
        self.shared.progress.notify_all();
    }

    /// The next batch, or None at the end of the plan. An error (a corrupt
    /// file) ends the reader: every later call returns None.
    pub fn next_batch(&mut self) -> Result<Option<Batch>> {
        if self.failed {
            return Ok(None);
        }
        let batch_size = self.batch_size;
        let mut columns: Option<Vec<Column>> = None;
        let mut rows = 0usize;
        let mut cur = self.cursor;
        while rows < batch_size && cur.unit < self.plan.len() {
            if cur.row >= self.plan[cur.unit].rows {
                self.release(cur.unit);
                cur = Cursor { unit: cur.unit + 1, row: 0 };
                continue;
            }
            if let Err(e) = self.load(cur.unit) {
                self.failed = true;
                self.stop();
                return Err(e);
            }
            let Some(mut chunk) = self.pending.pop_front() else {
                return err(format!("unit {} ended before its footer's row count", cur.unit));
            };
            let need = batch_size - rows;
            if chunk.rows > need {
                // Chunks are cut on batch boundaries, so this only happens if
                // a decoder returned a longer one; split it.
                let rest = Chunk {
                    columns: chunk
                        .columns
                        .iter()
                        .map(|c| {
                            let mut r = c.empty_like();
                            r.extend_rows(c, need, chunk.rows);
                            r
                        })
                        .collect(),
                    rows: chunk.rows - need,
                };
                chunk.columns = chunk
                    .columns
                    .iter()
                    .map(|c| {
                        let mut h = c.empty_like();
                        h.extend_rows(c, 0, need);
                        h
                    })
                    .collect();
                chunk.rows = need;
                self.pending.push_front(rest);
            }
            match &mut columns {
                // A whole chunk becomes the batch without a copy.
                None => columns = Some(chunk.columns),
                Some(acc) => {
                    for (dst, src) in acc.iter_mut().zip(&chunk.columns) {
                        dst.extend_rows(src, 0, chunk.rows);
                    }
                }
            }
            rows += chunk.rows;
            cur.row += chunk.rows as u64;
            if cur.row >= self.plan[cur.unit].rows {
                self.release(cur.unit);
                cur = Cursor { unit: cur.unit + 1, row: 0 };
            }
        }
        if rows == 0 || (self.drop_remainder && rows < batch_size) {
            // The remainder is dropped: the epoch is over.
            self.cursor = Cursor { unit: self.plan.len(), row: 0 };
            return Ok(None);
        }
        self.cursor = cur;
        Ok(Some(Batch { columns: columns.unwrap(), rows, end: cur }))
    }

    fn stop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        self.shared.progress.notify_all();
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        self.stop();
        // Unblock senders by draining, then join: no thread outlives the reader.
        while self.rx.try_recv().is_ok() {}
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Reads every row of every column RecIS can read in `files` (the first
/// file's schema; strings raw), through the same checks and decoders as a
/// training read: the number of rows, or the first error. The fuzz target
/// `orc_read` runs it on arbitrary bytes.
pub fn validate(files: &[PathBuf], limits: Limits) -> Result<u64> {
    let first = files.first().ok_or_else(|| IoError::Usage("no ORC files to read".into()))?;
    let (_, opened) = open_checked(first, &limits)?;
    let columns: Vec<ColumnRequest> = arrow_schema(&opened.meta, &ProjectionMask::all())
        .fields()
        .iter()
        .filter(|f| column_type_of(f.data_type()).is_some())
        .map(|f| ColumnRequest { name: f.name().clone(), hash: false, bucket: 0 })
        .collect();
    if columns.is_empty() {
        return err(format!("{}: no column of a type RecIS reads", first.display()));
    }
    let source = Source::open_with_limits(files, &columns, limits)?;
    let mut rows = 0u64;
    for unit in &source.units {
        rows += source.decode(unit, 0, 1024, 1024)?.iter().map(|c| c.rows as u64).sum::<u64>();
    }
    Ok(rows)
}

/// Lists the ORC files of paths (files, or directories read non-recursively
/// for `*.orc` files), sorted by path within each directory.
pub fn expand_paths(paths: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for p in paths {
        let meta = std::fs::metadata(p).map_err(|e| IoError::Data(format!("{}: cannot read: {e}", p.display())))?;
        if meta.is_dir() {
            let mut found: Vec<PathBuf> = std::fs::read_dir(p)
                .map_err(|e| IoError::Data(format!("{}: cannot list: {e}", p.display())))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|f| f.extension().is_some_and(|x| x == "orc") && f.is_file())
                .collect();
            if found.is_empty() {
                return err(format!("{}: directory holds no .orc files", p.display()));
            }
            found.sort();
            out.extend(found);
        } else {
            out.push(p.clone());
        }
    }
    Ok(out)
}
