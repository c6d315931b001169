//! Feature ops: turning raw column values into ids, over many features at
//! once. Every op here works on plain slices and is documented with its exact
//! semantics; the `*_many` forms run one op over a list of features in
//! parallel (rayon across features and, within a large feature, across
//! chunks), which is what the feature engine calls once per op type.
//!
//! Ragged data is (values, offsets) with `offsets.len() == rows + 1`,
//! `offsets[0] == 0`, non-decreasing, `offsets[rows] == values.len()`.

use rayon::prelude::*;

/// The string hash of RecIS: Google's FarmHash `Fingerprint64`
/// (`farmhashna::Hash64`), the function behind TensorFlow's
/// `to_hash_bucket_fast` and the original RecIS's "farm" hash, so ids match
/// models trained there. Stable across versions and platforms.
///
/// Test vectors: `""` → 11160318154034397263, `"a"` → 12917804110809363939,
/// `"hello world"` → 6381520714923946011.
pub fn fingerprint64(s: &[u8]) -> u64 {
    let len = s.len();
    if len <= 16 {
        return hash_len_0_to_16(s);
    }
    if len <= 32 {
        return hash_len_17_to_32(s);
    }
    if len <= 64 {
        return hash_len_33_to_64(s);
    }
    const SEED: u64 = 81;
    let mut x = SEED;
    let mut y = SEED.wrapping_mul(K1).wrapping_add(113);
    let mut z = shift_mix(y.wrapping_mul(K2).wrapping_add(113)).wrapping_mul(K2);
    let mut v = (0u64, 0u64);
    let mut w = (0u64, 0u64);
    x = x.wrapping_mul(K2).wrapping_add(fetch64(s, 0));
    // Whole 64-byte blocks, then the last 64 bytes (overlapping the tail).
    let end = ((len - 1) / 64) * 64;
    let last64 = end + ((len - 1) & 63) - 63;
    let mut p = 0;
    loop {
        x = (x.wrapping_add(y).wrapping_add(v.0).wrapping_add(fetch64(s, p + 8))).rotate_right(37).wrapping_mul(K1);
        y = (y.wrapping_add(v.1).wrapping_add(fetch64(s, p + 48))).rotate_right(42).wrapping_mul(K1);
        x ^= w.1;
        y = y.wrapping_add(v.0).wrapping_add(fetch64(s, p + 40));
        z = z.wrapping_add(w.0).rotate_right(33).wrapping_mul(K1);
        v = weak_hash_32_with_seeds(s, p, v.1.wrapping_mul(K1), x.wrapping_add(w.0));
        w = weak_hash_32_with_seeds(s, p + 32, z.wrapping_add(w.1), y.wrapping_add(fetch64(s, p + 16)));
        std::mem::swap(&mut z, &mut x);
        p += 64;
        if p == end {
            break;
        }
    }
    let mul = K1.wrapping_add((z & 0xff) << 1);
    p = last64;
    w.0 = w.0.wrapping_add(((len - 1) & 63) as u64);
    v.0 = v.0.wrapping_add(w.0);
    w.0 = w.0.wrapping_add(v.0);
    x = (x.wrapping_add(y).wrapping_add(v.0).wrapping_add(fetch64(s, p + 8))).rotate_right(37).wrapping_mul(mul);
    y = (y.wrapping_add(v.1).wrapping_add(fetch64(s, p + 48))).rotate_right(42).wrapping_mul(mul);
    x ^= w.1.wrapping_mul(9);
    y = y.wrapping_add(v.0.wrapping_mul(9)).wrapping_add(fetch64(s, p + 40));
    z = z.wrapping_add(w.0).rotate_right(33).wrapping_mul(mul);
    v = weak_hash_32_with_seeds(s, p, v.1.wrapping_mul(mul), x.wrapping_add(w.0));
    w = weak_hash_32_with_seeds(s, p + 32, z.wrapping_add(w.1), y.wrapping_add(fetch64(s, p + 16)));
    std::mem::swap(&mut z, &mut x);
    hash_len_16(
        hash_len_16(v.0, w.0, mul).wrapping_add(shift_mix(y).wrapping_mul(K0)).wrapping_add(z),
        hash_len_16(v.1, w.1, mul).wrapping_add(x),
        mul,
    )
}

const K0: u64 = 0xc3a5_c85c_97cb_3127;
const K1: u64 = 0xb492_b66f_be98_f273;
const K2: u64 = 0x9ae1_6a3b_2f90_404f;

#[inline(always)]
fn fetch64(s: &[u8], i: usize) -> u64 {
    u64::from_le_bytes(s[i..i + 8].try_into().expect("8 bytes"))
}

#[inline(always)]
fn fetch32(s: &[u8], i: usize) -> u64 {
    u32::from_le_bytes(s[i..i + 4].try_into().expect("4 bytes")) as u64
}

#[inline(always)]
fn shift_mix(v: u64) -> u64 {
    v ^ (v >> 47)
}

#[inline(always)]
fn hash_len_16(u: u64, v: u64, mul: u64) -> u64 {
    let mut a = (u ^ v).wrapping_mul(mul);
    a ^= a >> 47;
    let mut b = (v ^ a).wrapping_mul(mul);
    b ^= b >> 47;
    b.wrapping_mul(mul)
}

fn hash_len_0_to_16(s: &[u8]) -> u64 {
    let len = s.len();
    if len >= 8 {
        let mul = K2.wrapping_add(len as u64 * 2);
        let a = fetch64(s, 0).wrapping_add(K2);
        let b = fetch64(s, len - 8);
        let c = b.rotate_right(37).wrapping_mul(mul).wrapping_add(a);
        let d = a.rotate_right(25).wrapping_add(b).wrapping_mul(mul);
        return hash_len_16(c, d, mul);
    }
    if len >= 4 {
        let mul = K2.wrapping_add(len as u64 * 2);
        let a = fetch32(s, 0);
        return hash_len_16((len as u64).wrapping_add(a << 3), fetch32(s, len - 4), mul);
    }
    if len > 0 {
        let (a, b, c) = (s[0] as u32, s[len >> 1] as u32, s[len - 1] as u32);
        let y = a.wrapping_add(b << 8);
        let z = (len as u32).wrapping_add(c << 2);
        return shift_mix((y as u64).wrapping_mul(K2) ^ (z as u64).wrapping_mul(K0)).wrapping_mul(K2);
    }
    K2
}

fn hash_len_17_to_32(s: &[u8]) -> u64 {
    let len = s.len();
    let mul = K2.wrapping_add(len as u64 * 2);
    let a = fetch64(s, 0).wrapping_mul(K1);
    let b = fetch64(s, 8);
    let c = fetch64(s, len - 8).wrapping_mul(mul);
    let d = fetch64(s, len - 16).wrapping_mul(K2);
    hash_len_16(
        a.wrapping_add(b).rotate_right(43).wrapping_add(c.rotate_right(30)).wrapping_add(d),
        a.wrapping_add(b.wrapping_add(K2).rotate_right(18)).wrapping_add(c),
        mul,
    )
}

fn hash_len_33_to_64(s: &[u8]) -> u64 {
    let len = s.len();
    let mul = K2.wrapping_add(len as u64 * 2);
    let a = fetch64(s, 0).wrapping_mul(K2);
    let b = fetch64(s, 8);
    let c = fetch64(s, len - 8).wrapping_mul(mul);
    let d = fetch64(s, len - 16).wrapping_mul(K2);
    let y = a.wrapping_add(b).rotate_right(43).wrapping_add(c.rotate_right(30)).wrapping_add(d);
    let z = hash_len_16(y, a.wrapping_add(b.wrapping_add(K2).rotate_right(18)).wrapping_add(c), mul);
    let e = fetch64(s, 16).wrapping_mul(mul);
    let f = fetch64(s, 24);
    let g = y.wrapping_add(fetch64(s, len - 32)).wrapping_mul(mul);
    let h = z.wrapping_add(fetch64(s, len - 24)).wrapping_mul(mul);
    hash_len_16(
        e.wrapping_add(f).rotate_right(43).wrapping_add(g.rotate_right(30)).wrapping_add(h),
        e.wrapping_add(f.wrapping_add(a).rotate_right(18)).wrapping_add(g),
        mul,
    )
}

#[inline(always)]
fn weak_hash_32_with_seeds(s: &[u8], p: usize, mut a: u64, mut b: u64) -> (u64, u64) {
    let (w, x, y, z) = (fetch64(s, p), fetch64(s, p + 8), fetch64(s, p + 16), fetch64(s, p + 24));
    a = a.wrapping_add(w);
    b = b.wrapping_add(a).wrapping_add(z).rotate_right(21);
    let c = a;
    a = a.wrapping_add(x).wrapping_add(y);
    b = b.wrapping_add(a.rotate_right(44));
    (a.wrapping_add(z), b.wrapping_add(c))
}

/// `h % bucket` on the unsigned value, as an id (`bucket == 0`: no bucketing).
#[inline(always)]
fn bucket_of(h: u64, bucket: u64) -> i64 {
    if bucket == 0 {
        h as i64
    } else {
        (h % bucket) as i64
    }
}

/// Parallel map over `out` in chunks (sequential for small inputs, where
/// splitting costs more than it saves).
fn par_fill<F: Fn(usize) -> i64 + Sync>(out: &mut [i64], f: F) {
    const CHUNK: usize = 1 << 13;
    if out.len() <= CHUNK {
        for (k, o) in out.iter_mut().enumerate() {
            *o = f(k);
        }
    } else {
        out.par_chunks_mut(CHUNK).enumerate().for_each(|(c, o)| {
            for (k, x) in o.iter_mut().enumerate() {
                *x = f(c * CHUNK + k);
            }
        });
    }
}

/// Strings given as one byte buffer and `len + 1` byte offsets.
#[derive(Clone, Copy)]
pub struct Strings<'a> {
    pub bytes: &'a [u8],
    pub offsets: &'a [i64],
}

impl Strings<'_> {
    pub fn len(&self) -> usize {
        self.offsets.len().saturating_sub(1)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.offsets.is_empty() || self.offsets[0] != 0 {
            return Err("string offsets must start at 0".into());
        }
        if let Some(k) = self.offsets.windows(2).position(|w| w[1] < w[0]) {
            return Err(format!("string offsets must be non-decreasing (offsets[{}] > offsets[{}])", k, k + 1));
        }
        if *self.offsets.last().unwrap() as usize != self.bytes.len() {
            return Err(format!(
                "string offsets end at {} but the buffer holds {} bytes",
                self.offsets.last().unwrap(),
                self.bytes.len()
            ));
        }
        Ok(())
    }

    fn get(&self, k: usize) -> &[u8] {
        &self.bytes[self.offsets[k] as usize..self.offsets[k + 1] as usize]
    }
}

/// Hash of each string (`fingerprint64`, then `% bucket` on the unsigned
/// value when `bucket > 0`).
pub fn hash_strings(s: Strings<'_>, bucket: u64, out: &mut [i64]) {
    par_fill(out, |k| bucket_of(fingerprint64(s.get(k)), bucket));
}

/// Hash of each int64 id: `fingerprint64` of its 8 little-endian bytes, then
/// `% bucket` on the unsigned value when `bucket > 0`.
pub fn hash_ids(ids: &[i64], bucket: u64, out: &mut [i64]) {
    par_fill(out, |k| bucket_of(fingerprint64(&ids[k].to_le_bytes()), bucket));
}

/// `id % m` with the id taken as unsigned 64-bit (so a negative id is its
/// two's-complement value: `-1 % 10 == 18446744073709551615 % 10 == 5`).
/// The result is in `[0, m)`.
pub fn modulo(ids: &[i64], m: u64, out: &mut [i64]) {
    par_fill(out, |k| ((ids[k] as u64) % m) as i64);
}

/// Bucket index of each value against ascending `boundaries`, as
/// `torch.bucketize(x, boundaries, right=False)`: the number of boundaries
/// strictly less than `x` (so a value equal to a boundary falls in the bucket
/// to its left). NaN goes to the last bucket, `boundaries.len()`.
pub fn bucketize(values: &[f64], boundaries: &[f64], out: &mut [i64]) {
    par_fill(out, |k| {
        let x = values[k];
        if x.is_nan() {
            boundaries.len() as i64
        } else {
            boundaries.partition_point(|&b| b < x) as i64
        }
    });
}

/// Pairwise cross of two ragged features of the same batch size: row `i` of
/// the result holds, for every `a` of row `i` of `a` and then every `b` of
/// row `i` of `b` (a-major order), `fingerprint64(le_bytes(a) ++
/// le_bytes(b))`, then `% bucket` when `bucket > 0`. A row with an empty side
/// is empty. Returns (values, offsets), or an error naming the side whose
/// offsets are malformed, or a result too large to address.
pub fn cross(a: (&[i64], &[i64]), b: (&[i64], &[i64]), bucket: u64) -> Result<(Vec<i64>, Vec<i64>), String> {
    let (av, ao) = a;
    let (bv, bo) = b;
    check_offsets(ao, av.len(), "first")?;
    check_offsets(bo, bv.len(), "second")?;
    if ao.len() != bo.len() {
        return Err(format!("batch sizes differ: {} and {}", ao.len() - 1, bo.len() - 1));
    }
    let rows = ao.len() - 1;
    let mut offsets = vec![0i64; rows + 1];
    for i in 0..rows {
        let n = (ao[i + 1] - ao[i]).checked_mul(bo[i + 1] - bo[i]);
        offsets[i + 1] = match n.and_then(|n| offsets[i].checked_add(n)) {
            Some(o) if o <= i32::MAX as i64 => o,
            _ => return Err(format!("the cross of row {i} and the rows before it exceeds {} values", i32::MAX)),
        };
    }
    let mut values = vec![0i64; offsets[rows] as usize];
    let out = SendSlice(values.as_mut_ptr());
    (0..rows).into_par_iter().with_min_len(256).for_each(|i| {
        let mut k = offsets[i] as usize;
        let mut buf = [0u8; 16];
        for &x in &av[ao[i] as usize..ao[i + 1] as usize] {
            buf[..8].copy_from_slice(&x.to_le_bytes());
            for &y in &bv[bo[i] as usize..bo[i + 1] as usize] {
                buf[8..].copy_from_slice(&y.to_le_bytes());
                // SAFETY: `values` has offsets[rows] elements; row i writes
                // offsets[i]..offsets[i + 1], its a-count times its b-count
                // (the offsets were checked, so these ranges are in bounds),
                // and rows' ranges are disjoint.
                unsafe { *out.get().add(k) = bucket_of(fingerprint64(&buf), bucket) };
                k += 1;
            }
        }
    });
    Ok((values, offsets))
}

/// Checks ragged offsets: they start at 0, never decrease and end at the
/// number of values. `side` names the feature in the error.
pub fn check_offsets(offsets: &[i64], values: usize, side: &str) -> Result<(), String> {
    if offsets.is_empty() || offsets[0] != 0 || *offsets.last().unwrap() != values as i64 {
        return Err(format!("{side}: offsets must start at 0 and end at the number of values ({values})"));
    }
    if let Some(k) = offsets.windows(2).position(|w| w[1] < w[0]) {
        return Err(format!("{side}: offsets decrease at {k}: {} then {}", offsets[k], offsets[k + 1]));
    }
    Ok(())
}

/// Row `i` of a ragged feature truncated to at most `max_len` elements:
/// `keep_first` keeps the first ones (truncation on the right), otherwise the
/// last ones (truncation on the left). Returns, for the values, the index
/// ranges kept, as (source start per row, new offsets); the caller copies
/// values of any element width with them.
pub fn truncate_ranges(offsets: &[i64], max_len: usize, keep_first: bool) -> (Vec<i64>, Vec<i64>) {
    let rows = offsets.len() - 1;
    let mut starts = Vec::with_capacity(rows);
    let mut new_offsets = Vec::with_capacity(rows + 1);
    new_offsets.push(0i64);
    for i in 0..rows {
        let len = (offsets[i + 1] - offsets[i]) as usize;
        let keep = len.min(max_len);
        starts.push(if keep_first { offsets[i] } else { offsets[i + 1] - keep as i64 });
        new_offsets.push(new_offsets[i] + keep as i64);
    }
    (starts, new_offsets)
}

/// `k` independent hashes of each id, each into its own number of buckets:
/// hash `j` of id `x` is `fingerprint64(le_bytes(x) ++ le_bytes(j)) %
/// buckets[j]`. Output is row-major `[len(ids), k]`.
pub fn multi_hash(ids: &[i64], buckets: &[u64], out: &mut [i64]) {
    let k = buckets.len();
    out.par_chunks_mut(k.max(1) * 1024).enumerate().for_each(|(c, o)| {
        let mut buf = [0u8; 16];
        for (r, row) in o.chunks_mut(k).enumerate() {
            let x = ids[c * 1024 + r];
            buf[..8].copy_from_slice(&x.to_le_bytes());
            for (j, slot) in row.iter_mut().enumerate() {
                buf[8..].copy_from_slice(&(j as u64).to_le_bytes());
                *slot = bucket_of(fingerprint64(&buf), buckets[j]);
            }
        }
    });
}

// ----------------------------------------------------------------------------
// Several features in one call: each `*_many` checks every feature's input
// and parameters (an error names the feature by its index), then runs the
// features in parallel (and each in chunks).

/// `inputs` and `params` pair up one to one.
fn same_len(inputs: usize, params: usize, what: &str) -> Result<(), String> {
    if inputs != params {
        return Err(format!("{what}: {inputs} inputs but {params} parameters"));
    }
    Ok(())
}

/// `f(input, param, out)` for every pair, in parallel, `out` being
/// `len(input) * width` ids.
fn map_pairs<I: Sync, P: Sync>(
    inputs: &[I],
    params: &[P],
    len: impl Fn(&I, &P) -> usize + Sync,
    f: impl Fn(&I, &P, &mut [i64]) + Sync,
) -> Vec<Vec<i64>> {
    inputs
        .par_iter()
        .zip(params.par_iter())
        .map(|(x, p)| {
            let mut out = vec![0i64; len(x, p)];
            f(x, p, &mut out);
            out
        })
        .collect()
}

/// [`hash_strings`] of each column into its bucket count.
pub fn hash_strings_many(columns: &[Strings<'_>], buckets: &[u64]) -> Result<Vec<Vec<i64>>, String> {
    same_len(columns.len(), buckets.len(), "hash_strings_many")?;
    for (k, s) in columns.iter().enumerate() {
        s.validate().map_err(|m| format!("strings[{k}]: {m}"))?;
    }
    Ok(map_pairs(columns, buckets, |s, _| s.len(), |s, &b, o| hash_strings(*s, b, o)))
}

/// [`hash_ids`] of each batch into its bucket count.
pub fn hash_ids_many(ids: &[&[i64]], buckets: &[u64]) -> Result<Vec<Vec<i64>>, String> {
    same_len(ids.len(), buckets.len(), "hash_ids_many")?;
    Ok(map_pairs(ids, buckets, |x, _| x.len(), |x, &b, o| hash_ids(x, b, o)))
}

/// [`modulo`] of each batch; every `mod` must be at least 1.
pub fn mod_many(ids: &[&[i64]], mods: &[u64]) -> Result<Vec<Vec<i64>>, String> {
    same_len(ids.len(), mods.len(), "mod_many")?;
    if let Some(k) = mods.iter().position(|&m| m == 0) {
        return Err(format!("mods[{k}]: mod must be >= 1"));
    }
    Ok(map_pairs(ids, mods, |x, _| x.len(), |x, &m, o| modulo(x, m, o)))
}

/// [`multi_hash`] of each batch (row-major `[len, k]`); each needs at least
/// one bucket count, each at least 1.
pub fn multi_hash_many(ids: &[&[i64]], buckets: &[Vec<u64>]) -> Result<Vec<Vec<i64>>, String> {
    same_len(ids.len(), buckets.len(), "multi_hash_many")?;
    if let Some(k) = buckets.iter().position(|b| b.is_empty() || b.contains(&0)) {
        return Err(format!("buckets[{k}]: needs at least one bucket count, each >= 1"));
    }
    Ok(map_pairs(ids, buckets, |x, b| x.len() * b.len(), |x, b, o| multi_hash(x, b, o)))
}

/// [`bucketize`] of each batch against its boundaries, which must be sorted
/// and free of NaN.
pub fn bucketize_many(values: &[&[f64]], boundaries: &[&[f64]]) -> Result<Vec<Vec<i64>>, String> {
    same_len(values.len(), boundaries.len(), "bucketize_many")?;
    for (k, b) in boundaries.iter().enumerate() {
        if b.iter().any(|x| x.is_nan()) || b.windows(2).any(|w| w[0] > w[1]) {
            return Err(format!("boundaries[{k}] must be sorted and free of NaN"));
        }
    }
    Ok(map_pairs(values, boundaries, |x, _| x.len(), |x, b, o| bucketize(x, b, o)))
}

/// A ragged feature: (values, offsets).
pub type Ragged<'a> = (&'a [i64], &'a [i64]);

/// A ragged result: (values, offsets).
pub type RaggedVec = (Vec<i64>, Vec<i64>);

/// [`cross`] of each pair into its bucket count: (values, offsets) each.
pub fn cross_many(pairs: &[(Ragged<'_>, Ragged<'_>)], buckets: &[u64]) -> Result<Vec<RaggedVec>, String> {
    same_len(pairs.len(), buckets.len(), "cross_many")?;
    pairs
        .par_iter()
        .zip(buckets.par_iter())
        .enumerate()
        .map(|(k, (&(a, b), &bk))| cross(a, b, bk).map_err(|e| format!("pairs[{k}]: {e}")))
        .collect()
}

/// Each ragged feature (given by its offsets) truncated to its `max_lens`
/// (see [`truncate_ranges`]): (index of every kept value, new offsets).
pub fn truncate_many(offsets: &[&[i64]], max_lens: &[usize], keep_first: &[bool]) -> Result<Vec<RaggedVec>, String> {
    same_len(offsets.len(), max_lens.len(), "truncate_many")?;
    same_len(offsets.len(), keep_first.len(), "truncate_many")?;
    for (k, o) in offsets.iter().enumerate() {
        check_offsets(o, o.last().map_or(0, |&l| l.max(0) as usize), &format!("offsets[{k}]"))?;
    }
    Ok(offsets
        .par_iter()
        .zip(max_lens.par_iter().zip(keep_first.par_iter()))
        .map(|(o, (&m, &first))| {
            let (starts, new_offsets) = truncate_ranges(o, m, first);
            let mut index = Vec::with_capacity(*new_offsets.last().unwrap() as usize);
            for (i, &s) in starts.iter().enumerate() {
                index.extend(s..s + (new_offsets[i + 1] - new_offsets[i]));
            }
            (index, new_offsets)
        })
        .collect())
}

#[derive(Clone, Copy)]
struct SendSlice(*mut i64);
// SAFETY: used only for writes to disjoint ranges (see `cross`).
unsafe impl Send for SendSlice {}
// SAFETY: as above.
unsafe impl Sync for SendSlice {}
impl SendSlice {
    fn get(self) -> *mut i64 {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprint64_matches_published_vectors() {
        // Values of pyfarmhash.fingerprint64 (Google's reference code).
        let cases: &[(&[u8], u64)] = &[
            (b"", 11160318154034397263),
            (b"a", 12917804110809363939),
            (b"abc", 2640714258260161385),
            (b"hello world", 6381520714923946011),
            (b"0123456789abcdef", 6105018409752412263),
            ("click\u{e9}".as_bytes(), 15178036116117780813),
        ];
        for &(s, h) in cases {
            assert_eq!(fingerprint64(s), h, "{s:?}");
        }
        let runs: &[(u8, usize, u64)] = &[
            (b'x', 17, 11306081951414300581),
            (b'y', 33, 8610735037765521150),
            (b'z', 64, 294799756062990872),
            (b'q', 65, 7692644312256273193),
            (b'w', 128, 1651997402916279192),
            (b'e', 1000, 9485535561285839443),
        ];
        for &(c, n, h) in runs {
            assert_eq!(fingerprint64(&vec![c; n]), h, "{n} x {}", c as char);
        }
    }

    #[test]
    fn modulo_treats_ids_as_unsigned() {
        let mut out = [0i64; 3];
        modulo(&[-1, 7, i64::MIN], 10, &mut out);
        assert_eq!(out, [5, 7, 8]);
    }

    #[test]
    fn bucketize_puts_boundary_values_left() {
        let mut out = [0i64; 5];
        bucketize(&[0.5, 1.0, 1.5, 3.0, f64::NAN], &[1.0, 2.0], &mut out);
        assert_eq!(out, [0, 0, 1, 2, 2]);
    }

    #[test]
    fn cross_is_a_major_and_empty_rows_stay_empty() {
        let (v, o) = cross((&[1, 2, 3], &[0, 2, 3, 3]), (&[10, 20, 30], &[0, 1, 1, 3]), 0).unwrap();
        assert_eq!(o, vec![0, 2, 2, 2]);
        let h = |a: i64, b: i64| {
            let mut buf = [0u8; 16];
            buf[..8].copy_from_slice(&a.to_le_bytes());
            buf[8..].copy_from_slice(&b.to_le_bytes());
            fingerprint64(&buf) as i64
        };
        assert_eq!(v, vec![h(1, 10), h(2, 10)]);
    }

    #[test]
    fn cross_refuses_malformed_offsets() {
        assert!(cross((&[1, 2], &[0, 3]), (&[1], &[0, 1]), 0).unwrap_err().contains("first"));
        assert!(cross((&[1, 2], &[0, 2, 1, 2]), (&[1], &[0, 1, 1, 1]), 0).unwrap_err().contains("decrease"));
        assert!(cross((&[1], &[0, 1]), (&[1], &[0, 0, 1]), 0).unwrap_err().contains("batch sizes"));
        assert!(cross((&[], &[]), (&[], &[]), 0).is_err());
    }

    #[test]
    fn many_ops_name_the_feature_that_is_wrong() {
        assert!(mod_many(&[&[1], &[2]], &[3, 0]).unwrap_err().contains("mods[1]"));
        assert!(mod_many(&[&[1]], &[3, 4]).unwrap_err().contains("1 inputs but 2"));
        assert!(multi_hash_many(&[&[1]], &[vec![]]).unwrap_err().contains("buckets[0]"));
        assert!(bucketize_many(&[&[1.0]], &[&[2.0, 1.0]]).unwrap_err().contains("boundaries[0]"));
        assert!(truncate_many(&[&[0, 2], &[0, 3, 1]], &[1, 1], &[true, true]).unwrap_err().contains("offsets[1]"));
        let s = Strings { bytes: b"ab", offsets: &[0, 3] };
        assert!(hash_strings_many(&[s], &[0]).unwrap_err().contains("strings[0]"));
        assert!(cross_many(&[((&[1], &[0, 1]), (&[1], &[0, 2]))], &[0]).unwrap_err().contains("pairs[0]"));
        let (index, offsets) = truncate_many(&[&[0, 3, 4]], &[2], &[false]).unwrap().remove(0);
        assert_eq!((index, offsets), (vec![1, 2, 3], vec![0, 2, 3]));
        let out = multi_hash_many(&[&[5, 6]], &[vec![7, 11]]).unwrap();
        assert_eq!(out[0].len(), 4);
    }

    #[test]
    fn truncation_keeps_first_or_last() {
        let (s, o) = truncate_ranges(&[0, 5, 6, 6], 2, true);
        assert_eq!((s, o), (vec![0, 5, 6], vec![0, 2, 3, 3]));
        let (s, o) = truncate_ranges(&[0, 5, 6, 6], 2, false);
        assert_eq!((s, o), (vec![3, 5, 6], vec![0, 2, 3, 3]));
    }
}
