//! Checkpoint integrity: file checksums and the validation of safetensors
//! headers, before anything is loaded.
//!
//! Owns: `checksum_file` / `checksum_bytes` (xxh3-128, hex; the name of the
//! algorithm is `CHECKSUM_ALGORITHM`, recorded beside each digest so that it
//! can change later), and `check_safetensors`, a total parser of the
//! safetensors header: a pure function of a byte slice, with every size
//! bounded and checked arithmetic, that returns an error naming the tensor
//! and the reason and never panics (a fuzz target can call it on arbitrary
//! bytes). It must not: know about Python, read the tensor data, or decide
//! what a checkpoint holds (the Python checkpoint manager does).

use std::fmt;
use std::fs::File;
use std::io::Read;
use std::path::Path;

use serde_json::Value;
use xxhash_rust::xxh3::Xxh3;

/// The name recorded with each digest.
pub const CHECKSUM_ALGORITHM: &str = "xxh3-128";

/// The largest header accepted (safetensors' own cap): a file claiming more
/// is refused before anything is allocated for it.
pub const MAX_HEADER_BYTES: u64 = 100_000_000;

/// Bytes read at a time while checksumming.
const READ_BYTES: usize = 1 << 20;

/// Why a checkpoint file cannot be used. The messages name the tensor (or
/// the part of the header) and the reason, not the file: the caller names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CkptError {
    /// The file could not be read.
    Io(String),
    /// The bytes are not a valid safetensors file.
    Invalid(String),
}

impl fmt::Display for CkptError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CkptError::Io(m) => write!(f, "unreadable ({m})"),
            CkptError::Invalid(m) => f.write_str(m),
        }
    }
}

impl std::error::Error for CkptError {}

fn invalid(m: impl Into<String>) -> CkptError {
    CkptError::Invalid(m.into())
}

/// The xxh3-128 digest of a file, 32 hex digits, read 1 MiB at a time.
pub fn checksum_file(path: &Path) -> Result<String, CkptError> {
    let mut file = File::open(path).map_err(|e| CkptError::Io(e.to_string()))?;
    let mut hasher = Xxh3::new();
    let mut buf = vec![0u8; READ_BYTES];
    loop {
        match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => hasher.update(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(CkptError::Io(e.to_string())),
        }
    }
    Ok(format!("{:032x}", hasher.digest128()))
}

/// The xxh3-128 digest of bytes, 32 hex digits (the same as `checksum_file`
/// of a file holding them).
pub fn checksum_bytes(bytes: &[u8]) -> String {
    format!("{:032x}", xxhash_rust::xxh3::xxh3_128(bytes))
}

/// A tensor's element type, as safetensors names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dtype {
    Bool,
    U8,
    I8,
    F8E5M2,
    F8E4M3,
    I16,
    U16,
    F16,
    BF16,
    I32,
    U32,
    F32,
    F64,
    I64,
    U64,
}

impl Dtype {
    fn parse(s: &str) -> Option<Dtype> {
        Some(match s {
            "BOOL" => Dtype::Bool,
            "U8" => Dtype::U8,
            "I8" => Dtype::I8,
            "F8_E5M2" => Dtype::F8E5M2,
            "F8_E4M3" => Dtype::F8E4M3,
            "I16" => Dtype::I16,
            "U16" => Dtype::U16,
            "F16" => Dtype::F16,
            "BF16" => Dtype::BF16,
            "I32" => Dtype::I32,
            "U32" => Dtype::U32,
            "F32" => Dtype::F32,
            "F64" => Dtype::F64,
            "I64" => Dtype::I64,
            "U64" => Dtype::U64,
            _ => return None,
        })
    }

    /// The name in the header.
    pub fn name(self) -> &'static str {
        match self {
            Dtype::Bool => "BOOL",
            Dtype::U8 => "U8",
            Dtype::I8 => "I8",
            Dtype::F8E5M2 => "F8_E5M2",
            Dtype::F8E4M3 => "F8_E4M3",
            Dtype::I16 => "I16",
            Dtype::U16 => "U16",
            Dtype::F16 => "F16",
            Dtype::BF16 => "BF16",
            Dtype::I32 => "I32",
            Dtype::U32 => "U32",
            Dtype::F32 => "F32",
            Dtype::F64 => "F64",
            Dtype::I64 => "I64",
            Dtype::U64 => "U64",
        }
    }

    /// Bytes an element.
    pub fn size(self) -> u64 {
        match self {
            Dtype::Bool | Dtype::U8 | Dtype::I8 | Dtype::F8E5M2 | Dtype::F8E4M3 => 1,
            Dtype::I16 | Dtype::U16 | Dtype::F16 | Dtype::BF16 => 2,
            Dtype::I32 | Dtype::U32 | Dtype::F32 => 4,
            Dtype::F64 | Dtype::I64 | Dtype::U64 => 8,
        }
    }
}

/// One tensor of a header: its bytes are `data[begin..end]` of the data
/// that follows the header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<u64>,
    pub begin: u64,
    pub end: u64,
}

/// A validated header: the tensors in the order of their data, the
/// `__metadata__` strings, and the sizes of the header and of the data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub tensors: Vec<TensorInfo>,
    pub metadata: Vec<(String, String)>,
    pub header_len: u64,
    pub data_len: u64,
}

/// Validates a whole safetensors file held in `bytes`: an 8-byte
/// little-endian header length, the JSON header, then the data. Checked:
/// the length is at most `MAX_HEADER_BYTES` and within the file; the JSON is
/// an object of tensors `{dtype, shape, data_offsets}` plus an optional
/// `__metadata__` object of strings; every dtype is known; each tensor's
/// element count × dtype size equals its offset range (checked arithmetic);
/// the ranges lie within the data, do not overlap and cover it without gaps
/// (as the safetensors loader requires).
///
/// ```
/// use recis_core::ckpt::check_safetensors;
/// let json = br#"{"x":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#;
/// let mut file = (json.len() as u64).to_le_bytes().to_vec();
/// file.extend_from_slice(json);
/// file.extend_from_slice(&[0u8; 8]);
/// assert_eq!(check_safetensors(&file).unwrap().tensors[0].shape, vec![2]);
/// ```
pub fn check_safetensors(bytes: &[u8]) -> Result<Header, CkptError> {
    let header_len = header_length(bytes, bytes.len() as u64)?;
    // In range: header_length checked 8 + header_len <= bytes.len().
    let end = 8 + header_len as usize;
    check_header(&bytes[8..end], header_len, bytes.len() as u64 - 8 - header_len)
}

/// `check_safetensors` of a file, reading only its header (the data is
/// checked by size, not read).
pub fn check_safetensors_file(path: &Path) -> Result<Header, CkptError> {
    let io = |e: std::io::Error| CkptError::Io(e.to_string());
    let mut file = File::open(path).map_err(io)?;
    let file_len = file.metadata().map_err(io)?.len();
    let mut prefix = [0u8; 8];
    let got = read_up_to(&mut file, &mut prefix).map_err(io)?;
    let header_len = header_length(&prefix[..got], file_len)?;
    // Bounded by MAX_HEADER_BYTES and by the file's size.
    let mut json = vec![0u8; header_len as usize];
    let got = read_up_to(&mut file, &mut json).map_err(io)?;
    if got as u64 != header_len {
        return Err(invalid(format!("truncated: the header is {header_len} bytes but only {got} could be read")));
    }
    check_header(&json, header_len, file_len.saturating_sub(8).saturating_sub(header_len))
}

fn read_up_to(file: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match file.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

/// The header length of a file of `file_len` bytes whose first bytes are
/// `prefix`, bounded by the file and by `MAX_HEADER_BYTES`.
fn header_length(prefix: &[u8], file_len: u64) -> Result<u64, CkptError> {
    let Some(first) = prefix.get(..8) else {
        return Err(invalid(format!(
            "truncated: {file_len} bytes, shorter than the 8-byte header length (not a safetensors file?)"
        )));
    };
    let mut le = [0u8; 8];
    le.copy_from_slice(first);
    let n = u64::from_le_bytes(le);
    if n > MAX_HEADER_BYTES {
        return Err(invalid(format!(
            "the header claims {n} bytes, more than the cap of {MAX_HEADER_BYTES} (not a safetensors file?)"
        )));
    }
    let after = file_len.saturating_sub(8);
    if n > after {
        return Err(invalid(format!(
            "truncated: the header claims {n} bytes but the file has {after} after the length"
        )));
    }
    Ok(n)
}

/// Validates the JSON header of `header_len` bytes followed by `data_len`
/// bytes of data.
fn check_header(json: &[u8], header_len: u64, data_len: u64) -> Result<Header, CkptError> {
    let value: Value = serde_json::from_slice(json).map_err(|e| invalid(format!("the header is not JSON ({e})")))?;
    let Value::Object(map) = value else {
        return Err(invalid(format!("the header is JSON {}, not an object of tensors", kind(&value))));
    };
    let mut tensors = Vec::with_capacity(map.len());
    let mut metadata = Vec::new();
    for (name, entry) in &map {
        if name == "__metadata__" {
            let Value::Object(m) = entry else {
                return Err(invalid(format!("__metadata__ is {}, not an object of strings", kind(entry))));
            };
            for (k, v) in m {
                let Value::String(s) = v else {
                    return Err(invalid(format!("__metadata__[{k:?}] is {}, not a string", kind(v))));
                };
                metadata.push((k.clone(), s.clone()));
            }
            continue;
        }
        tensors.push(tensor_info(name, entry, data_len)?);
    }
    tensors.sort_by_key(|t| (t.begin, t.end));
    let mut covered = 0u64;
    for (k, t) in tensors.iter().enumerate() {
        if t.begin < covered {
            // The previous range (k >= 1 here: covered starts at 0) ends past this one's start.
            let (other, b, e) = k
                .checked_sub(1)
                .and_then(|p| tensors.get(p))
                .map_or(("?", 0, 0), |p| (p.name.as_str(), p.begin, p.end));
            return Err(invalid(format!(
                "tensor {:?}: data_offsets [{}, {}] overlap tensor {other:?}'s [{b}, {e}]",
                t.name, t.begin, t.end
            )));
        }
        if t.begin > covered {
            return Err(invalid(format!(
                "tensor {:?}: data_offsets start at {} but the data before ends at {covered} (a gap)",
                t.name, t.begin
            )));
        }
        covered = t.end;
    }
    if covered != data_len {
        return Err(invalid(format!(
            "the tensors' data ends at byte {covered} but the file holds {data_len} bytes of data (trailing bytes)"
        )));
    }
    Ok(Header { tensors, metadata, header_len, data_len })
}

fn tensor_info(name: &str, entry: &Value, data_len: u64) -> Result<TensorInfo, CkptError> {
    let bad = |why: String| invalid(format!("tensor {name:?}: {why}"));
    let Value::Object(fields) = entry else {
        return Err(bad(format!("is {}, not an object {{dtype, shape, data_offsets}}", kind(entry))));
    };
    if let Some(extra) = fields.keys().find(|k| !matches!(k.as_str(), "dtype" | "shape" | "data_offsets")) {
        return Err(bad(format!("unknown field {extra:?}")));
    }
    let dtype = match fields.get("dtype") {
        Some(Value::String(s)) => Dtype::parse(s).ok_or_else(|| bad(format!("unknown dtype {s:?}")))?,
        Some(v) => return Err(bad(format!("dtype is {}, not a string", kind(v)))),
        None => return Err(bad("has no dtype".into())),
    };
    let shape = match fields.get("shape") {
        Some(Value::Array(dims)) => dims
            .iter()
            .map(|d| d.as_u64().ok_or_else(|| bad(format!("shape has {d}, not a non-negative integer"))))
            .collect::<Result<Vec<u64>, _>>()?,
        Some(v) => return Err(bad(format!("shape is {}, not an array", kind(v)))),
        None => return Err(bad("has no shape".into())),
    };
    let (begin, end) = match fields.get("data_offsets") {
        Some(Value::Array(o)) if o.len() == 2 => match (o[0].as_u64(), o[1].as_u64()) {
            (Some(b), Some(e)) => (b, e),
            _ => return Err(bad("data_offsets are not two non-negative integers".into())),
        },
        Some(_) => return Err(bad("data_offsets are not [begin, end]".into())),
        None => return Err(bad("has no data_offsets".into())),
    };
    if begin > end {
        return Err(bad(format!("data_offsets [{begin}, {end}] end before they begin")));
    }
    if end > data_len {
        return Err(bad(format!(
            "data_offsets [{begin}, {end}] run past the data's {data_len} bytes (truncated file?)"
        )));
    }
    let bytes = shape
        .iter()
        .try_fold(dtype.size(), |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| bad(format!("shape {shape:?} of {} overflows 64 bits of bytes", dtype.name())))?;
    if bytes != end - begin {
        return Err(bad(format!(
            "shape {shape:?} of {} is {bytes} bytes but data_offsets [{begin}, {end}] hold {}",
            dtype.name(),
            end - begin
        )));
    }
    Ok(TensorInfo { name: name.to_owned(), dtype, shape, begin, end })
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn file(json: &str, data_len: usize) -> Vec<u8> {
        let mut f = (json.len() as u64).to_le_bytes().to_vec();
        f.extend_from_slice(json.as_bytes());
        f.extend(std::iter::repeat_n(0u8, data_len));
        f
    }

    fn reason(bytes: &[u8]) -> String {
        check_safetensors(bytes).unwrap_err().to_string()
    }

    const TWO: &str = r#"{"__metadata__":{"format":"pt"},
        "a":{"dtype":"F32","shape":[2,3],"data_offsets":[0,24]},
        "b":{"dtype":"I64","shape":[1],"data_offsets":[24,32]}}"#;

    #[test]
    fn a_valid_header_is_returned_in_data_order() {
        let h = check_safetensors(&file(TWO, 32)).unwrap();
        let names: Vec<_> = h.tensors.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["a", "b"]);
        assert_eq!(h.tensors[0].shape, vec![2, 3]);
        assert_eq!(h.tensors[1].dtype, Dtype::I64);
        assert_eq!(h.metadata, vec![("format".to_owned(), "pt".to_owned())]);
        assert_eq!(h.data_len, 32);
    }

    #[test]
    fn a_huge_header_length_is_refused_before_allocating() {
        let mut f = u64::MAX.to_le_bytes().to_vec();
        f.extend_from_slice(b"{}");
        assert!(reason(&f).contains("more than the cap"), "{}", reason(&f));
        let mut f = 1000u64.to_le_bytes().to_vec();
        f.extend_from_slice(b"{}");
        assert!(reason(&f).contains("truncated: the header claims 1000 bytes"), "{}", reason(&f));
        assert!(reason(b"abc").contains("shorter than the 8-byte header length"));
    }

    #[test]
    fn overlapping_offsets_name_both_tensors() {
        let json = r#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},
                       "b":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}}"#;
        let r = reason(&file(json, 16));
        assert!(r.contains(r#"tensor "b": data_offsets [8, 16] overlap tensor "a"'s [0, 16]"#), "{r}");
    }

    #[test]
    fn a_shape_whose_size_overflows_is_refused() {
        let json = r#"{"a":{"dtype":"F64","shape":[4294967296,4294967296],"data_offsets":[0,0]}}"#;
        assert!(reason(&file(json, 0)).contains(r#"tensor "a": shape [4294967296, 4294967296] of F64 overflows"#));
        let json = r#"{"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#;
        assert!(reason(&file(json, 8)).contains("is 12 bytes but data_offsets [0, 8] hold 8"));
    }

    #[test]
    fn json_that_is_not_an_object_of_tensors_is_refused() {
        assert!(reason(&file("[1,2]", 0)).contains("the header is JSON an array, not an object"));
        assert!(reason(&file("{\"a\": 1,", 0)).contains("the header is not JSON"));
        assert!(reason(&file(r#"{"a":[1]}"#, 0)).contains(r#"tensor "a": is an array"#));
        assert!(reason(&file(r#"{"__metadata__":{"k":1}}"#, 0)).contains(r#"__metadata__["k"] is a number"#));
    }

    #[test]
    fn an_unknown_dtype_is_named() {
        let json = r#"{"w":{"dtype":"F128","shape":[1],"data_offsets":[0,16]}}"#;
        assert!(reason(&file(json, 16)).contains(r#"tensor "w": unknown dtype "F128""#));
    }

    #[test]
    fn offsets_past_the_data_gaps_and_trailing_bytes_are_refused() {
        let json = r#"{"a":{"dtype":"U8","shape":[8],"data_offsets":[0,8]}}"#;
        assert!(reason(&file(json, 4)).contains("run past the data's 4 bytes"));
        assert!(reason(&file(json, 9)).contains("trailing bytes"));
        let json = r#"{"a":{"dtype":"U8","shape":[4],"data_offsets":[4,8]}}"#;
        assert!(reason(&file(json, 8)).contains("(a gap)"));
    }

    #[test]
    fn the_file_reader_agrees_with_the_slice_reader() {
        let dir = std::env::temp_dir().join(format!("recis-ckpt-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("two.safetensors");
        let bytes = file(TWO, 32);
        std::fs::write(&path, &bytes).unwrap();
        assert_eq!(check_safetensors_file(&path).unwrap(), check_safetensors(&bytes).unwrap());
        assert_eq!(checksum_file(&path).unwrap(), checksum_bytes(&bytes));
        std::fs::write(&path, &bytes[..bytes.len() - 1]).unwrap();
        assert!(check_safetensors_file(&path).unwrap_err().to_string().contains("run past the data"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_checksum_streams_over_reads_and_sees_one_flipped_bit() {
        let dir = std::env::temp_dir().join(format!("recis-ckpt-sum-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("big");
        let mut bytes: Vec<u8> = (0..(3 * READ_BYTES + 17)).map(|i| (i * 31 % 251) as u8).collect();
        std::fs::write(&path, &bytes).unwrap();
        let sum = checksum_file(&path).unwrap();
        assert_eq!(sum, checksum_bytes(&bytes));
        assert_eq!(sum.len(), 32);
        bytes[2 * READ_BYTES + 5] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        assert_ne!(checksum_file(&path).unwrap(), sum);
        assert!(matches!(checksum_file(&dir.join("absent")), Err(CkptError::Io(_))));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    proptest! {
        // What a fuzz target does: arbitrary bytes never panic.
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = check_safetensors(&bytes);
        }

        // Mutations of a valid file: refused or accepted, never a panic; an
        // accepted one still has its ranges inside the data.
        #[test]
        fn mutated_headers_never_panic(at in 0usize..400, byte in any::<u8>(), cut in 0usize..400) {
            let mut f = file(TWO, 32);
            let at = at % f.len();
            f[at] = byte;
            f.truncate(f.len() - cut % f.len());
            if let Ok(h) = check_safetensors(&f) {
                for t in &h.tensors {
                    prop_assert!(t.begin <= t.end && t.end <= h.data_len);
                }
            }
        }

        #[test]
        fn any_header_length_prefix_is_bounded(n in any::<u64>(), tail in proptest::collection::vec(any::<u8>(), 0..64)) {
            let mut f = n.to_le_bytes().to_vec();
            f.extend_from_slice(&tail);
            let _ = check_safetensors(&f);
        }
    }
}
