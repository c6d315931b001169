//! Pooling of looked-up rows into bags, written sample-major.
//!
//! A step's lookup gives, for a group of features, the distinct rows `w`
//! (`[rows, dim]`) and for every id position the row it reads (`inverse`).
//! The bags are the features' ragged rows: bag `k = f * batch + b` (feature
//! `f`, sample `b`) spans positions `offsets[k]..offsets[k + 1]`. Pooling
//! writes bag `(f, b)` to `out[b, f, :]`, so a model that wants every
//! feature of a sample side by side (`[batch, features, dim]`, as DeepFM and
//! DLRM do) gets it without a stack or a transpose.
//!
//! - sum: `out = Σ weight_p · w[inverse_p]` (weight 1 without weights);
//! - mean: the sum divided by the bag's length, or with weights by the bag's
//!   total weight (a total of 0 divides by 1, as `recis.nn.pool` does); an
//!   empty bag is 0.
//!
//! The backward gives the dense gradient of `w`: row `r` sums, in position
//! order, the gradients of the bags that read it times the position's scale.
//! Threads own disjoint ranges of rows, so it needs no atomics and its sums
//! do not depend on the number of threads.

use rayon::prelude::*;

/// The bags of a pooled lookup (see the module docs).
pub struct Bags<'a> {
    inverse: &'a [i64],
    offsets: &'a [i64],
    weights: Option<&'a [f32]>,
    mean: bool,
    features: usize,
    batch: usize,
    rows: usize,
}

impl<'a> Bags<'a> {
    /// Checks the layout: `offsets` holds `features * batch + 1` non-decreasing
    /// positions from 0 to `inverse.len()`, every `inverse` entry is a row below
    /// `rows`, and `weights` (if any) has one value a position.
    pub fn new(
        inverse: &'a [i64],
        offsets: &'a [i64],
        weights: Option<&'a [f32]>,
        mean: bool,
        features: usize,
        rows: usize,
    ) -> Result<Self, String> {
        if features == 0 {
            return Err("features must be at least 1".into());
        }
        if offsets.is_empty() || (offsets.len() - 1) % features != 0 {
            return Err(format!(
                "offsets: expected features x batch + 1 entries for {features} features, got {}",
                offsets.len()
            ));
        }
        if offsets[0] != 0 || offsets[offsets.len() - 1] != inverse.len() as i64 {
            return Err(format!(
                "offsets must run from 0 to the {} positions, got {}..{}",
                inverse.len(),
                offsets[0],
                offsets[offsets.len() - 1]
            ));
        }
        if let Some(k) = offsets.windows(2).position(|p| p[1] < p[0]) {
            return Err(format!(
                "offsets must not decrease: offsets[{}] = {} > offsets[{}] = {}",
                k,
                offsets[k],
                k + 1,
                offsets[k + 1]
            ));
        }
        if let Some(p) = inverse.iter().position(|&r| r < 0 || r as u64 >= rows as u64) {
            return Err(format!("inverse[{p}] = {} is not a row of the {rows} looked-up rows", inverse[p]));
        }
        if let Some(w) = weights {
            if w.len() != inverse.len() {
                return Err(format!("weights: expected {} values (one a position), got {}", inverse.len(), w.len()));
            }
        }
        let batch = (offsets.len() - 1) / features;
        Ok(Bags { inverse, offsets, weights, mean, features, batch, rows })
    }

    pub fn batch(&self) -> usize {
        self.batch
    }

    pub fn features(&self) -> usize {
        self.features
    }

    /// Positions of bag `k` and the factor its sum is multiplied by.
    #[inline]
    fn bag(&self, k: usize) -> (std::ops::Range<usize>, f32) {
        let span = self.offsets[k] as usize..self.offsets[k + 1] as usize;
        let scale = if !self.mean || span.is_empty() {
            1.0
        } else {
            match self.weights {
                None => 1.0 / span.len() as f32,
                Some(w) => {
                    let total: f32 = w[span.clone()].iter().sum();
                    if total == 0.0 {
                        1.0
                    } else {
                        1.0 / total
                    }
                }
            }
        };
        (span, scale)
    }

    #[inline]
    fn weight(&self, p: usize) -> f32 {
        self.weights.map_or(1.0, |w| w[p])
    }

    /// Pools `w` (`[rows, dim]`) into `out` (`[batch, features, dim]`).
    pub fn forward(&self, w: &[f32], dim: usize, out: &mut [f32]) -> Result<(), String> {
        self.check(w.len(), "w", self.rows, dim)?;
        self.check(out.len(), "out", self.batch * self.features, dim)?;
        if dim == 0 || self.batch == 0 {
            return Ok(());
        }
        let f_n = self.features;
        const SAMPLES: usize = 64;
        // torch's team sleeps while the rayon threads pool (omp.rs).
        crate::omp::parked(|| {
            out.par_chunks_mut(SAMPLES * f_n * dim).enumerate().for_each(|(c, chunk)| {
                for (i, sample) in chunk.chunks_mut(f_n * dim).enumerate() {
                    let b = c * SAMPLES + i;
                    for (f, o) in sample.chunks_mut(dim).enumerate() {
                        let (span, scale) = self.bag(f * self.batch + b);
                        o.fill(0.0);
                        for p in span {
                            let r = self.inverse[p] as usize;
                            axpy(o, &w[r * dim..(r + 1) * dim], self.weight(p));
                        }
                        if scale != 1.0 {
                            o.iter_mut().for_each(|o| *o *= scale);
                        }
                    }
                }
            });
        });
        Ok(())
    }

    /// The gradient of `w` (`[rows, dim]`, overwritten) from the gradient of
    /// the pooled output (`[batch, features, dim]`).
    pub fn backward(&self, grad: &[f32], dim: usize, out: &mut [f32]) -> Result<(), String> {
        self.check(grad.len(), "grad", self.batch * self.features, dim)?;
        self.check(out.len(), "out", self.rows, dim)?;
        if dim == 0 || self.rows == 0 {
            return Ok(());
        }
        let threads = rayon::current_num_threads().max(1);
        let per = self.rows.div_ceil(threads).max(1);
        let f_n = self.features;
        crate::omp::parked(|| {
            out.par_chunks_mut(per * dim).enumerate().for_each(|(t, own)| {
                let (lo, hi) = (t * per, t * per + own.len() / dim);
                own.fill(0.0);
                for f in 0..f_n {
                    for b in 0..self.batch {
                        let (span, scale) = self.bag(f * self.batch + b);
                        let g = &grad[(b * f_n + f) * dim..(b * f_n + f + 1) * dim];
                        for p in span {
                            let r = self.inverse[p] as usize;
                            if r < lo || r >= hi {
                                continue;
                            }
                            let a = self.weight(p) * scale;
                            axpy(&mut own[(r - lo) * dim..(r - lo + 1) * dim], g, a);
                        }
                    }
                }
            });
        });
        Ok(())
    }

    /// The number of rows of the looked-up block.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// The number of rows of the pooled output (`batch * features`).
    pub fn outputs(&self) -> usize {
        self.batch * self.features
    }

    fn check(&self, len: usize, what: &str, n: usize, dim: usize) -> Result<(), String> {
        if len != n * dim {
            return Err(format!("{what}: expected {} values ({n} x dim {dim}), got {len}", n * dim));
        }
        Ok(())
    }
}

/// `o += a * x` (equal lengths), eight lanes at a time.
#[inline(always)]
fn axpy(o: &mut [f32], x: &[f32], a: f32) {
    let n = o.len().min(x.len());
    let cut = n - n % 8;
    let (o8, orest) = o[..n].split_at_mut(cut);
    let (x8, xrest) = x[..n].split_at(cut);
    for (oc, xc) in o8.chunks_exact_mut(8).zip(x8.chunks_exact(8)) {
        for j in 0..8 {
            oc[j] += a * xc[j];
        }
    }
    for (o, &x) in orest.iter_mut().zip(xrest) {
        *o += a * x;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The plain definition: per bag, a loop over its positions.
    fn naive(
        w: &[f32],
        dim: usize,
        inverse: &[i64],
        offsets: &[i64],
        weights: Option<&[f32]>,
        mean: bool,
        features: usize,
    ) -> Vec<f32> {
        let batch = (offsets.len() - 1) / features;
        let mut out = vec![0.0f32; batch * features * dim];
        for f in 0..features {
            for b in 0..batch {
                let k = f * batch + b;
                let (lo, hi) = (offsets[k] as usize, offsets[k + 1] as usize);
                let mut total = 0.0f32;
                for p in lo..hi {
                    let a = weights.map_or(1.0, |w| w[p]);
                    total += a;
                    for j in 0..dim {
                        out[(b * features + f) * dim + j] += a * w[inverse[p] as usize * dim + j];
                    }
                }
                if mean && hi > lo {
                    let s = if weights.is_none() {
                        (hi - lo) as f32
                    } else if total == 0.0 {
                        1.0
                    } else {
                        total
                    };
                    for j in 0..dim {
                        out[(b * features + f) * dim + j] *= 1.0 / s;
                    }
                }
            }
        }
        out
    }

    type Case = (usize, usize, usize, Vec<usize>, Vec<i64>, Vec<f32>, bool, bool);

    /// (features, rows, dim, bag lengths, inverse, weights, weighted, mean).
    fn case() -> impl Strategy<Value = Case> {
        (1usize..4, 1usize..6, 1usize..12, 1usize..5, any::<bool>(), any::<bool>()).prop_flat_map(
            |(features, batch, rows, dim, weighted, mean)| {
                proptest::collection::vec(0usize..4, features * batch).prop_flat_map(move |lens| {
                    let n: usize = lens.iter().sum();
                    let inverse = proptest::collection::vec(0i64..rows as i64, n);
                    let weights = proptest::collection::vec(-2.0f32..2.0, n);
                    (Just(lens), inverse, weights)
                        .prop_map(move |(lens, inv, wts)| (features, rows, dim, lens, inv, wts, weighted, mean))
                })
            },
        )
    }

    fn offsets_of(lens: &[usize]) -> Vec<i64> {
        let mut o = vec![0i64];
        for &l in lens {
            o.push(o[o.len() - 1] + l as i64);
        }
        o
    }

    proptest! {
        #[test]
        fn forward_and_backward_match_the_definition((features, rows, dim, lens, inverse, wts, weighted, mean) in case()) {
            let offsets = offsets_of(&lens);
            let weights = if weighted { Some(&wts[..]) } else { None };
            let w: Vec<f32> = (0..rows * dim).map(|i| (i as f32 * 0.37).sin()).collect();
            let bags = Bags::new(&inverse, &offsets, weights, mean, features, rows).unwrap();
            let mut out = vec![f32::NAN; bags.batch() * features * dim];
            bags.forward(&w, dim, &mut out).unwrap();
            let want = naive(&w, dim, &inverse, &offsets, weights, mean, features);
            for (a, b) in out.iter().zip(&want) {
                prop_assert!((a - b).abs() <= 1e-5 * (1.0 + b.abs()), "{out:?} vs {want:?}");
            }
            // Backward: the gradient of <grad, pool(w)> with respect to w,
            // column by column, is pool's transpose; check it against the
            // naive forward's response to each unit row.
            let grad: Vec<f32> = (0..out.len()).map(|i| (i as f32 * 0.91).cos()).collect();
            let mut gw = vec![f32::NAN; rows * dim];
            bags.backward(&grad, dim, &mut gw).unwrap();
            for r in 0..rows {
                for j in 0..dim {
                    let mut unit = vec![0.0f32; rows * dim];
                    unit[r * dim + j] = 1.0;
                    let resp = naive(&unit, dim, &inverse, &offsets, weights, mean, features);
                    let want: f32 = resp.iter().zip(&grad).map(|(a, b)| a * b).sum();
                    prop_assert!((gw[r * dim + j] - want).abs() <= 1e-4 * (1.0 + want.abs()));
                }
            }
        }
    }

    #[test]
    fn bad_layouts_are_named() {
        let inv = [0i64, 1, 5];
        let e = Bags::new(&inv, &[0, 1, 3], None, false, 1, 2).err().unwrap();
        assert!(e.contains("inverse[2] = 5"), "{e}");
        let e = Bags::new(&inv, &[0, 2, 1, 3], None, false, 1, 9).err().unwrap();
        assert!(e.contains("must not decrease"), "{e}");
        let e = Bags::new(&inv, &[0, 3], None, false, 2, 9).err().unwrap();
        assert!(e.contains("features x batch + 1"), "{e}");
        let e = Bags::new(&inv, &[0, 3], Some(&[1.0]), false, 1, 9).err().unwrap();
        assert!(e.contains("weights"), "{e}");
        let bags = Bags::new(&inv, &[0, 3], None, false, 1, 9).unwrap();
        assert!(bags.forward(&[0.0; 4], 2, &mut [0.0; 2]).unwrap_err().contains("w: expected 18"));
    }
}
