//! Initial values of new rows: a pure function of (table seed, id), so a row's
//! first value does not depend on insert order, thread count, shard or world
//! size.

use crate::hash::IdStream;

/// How the embedding part of a new row is filled.
///
/// Xavier and Kaiming take their fan from the embedding dimension (the only
/// fan a dynamic table has): Xavier uses fan_in = fan_out = dim, Kaiming uses
/// fan_in = dim. They resolve to `Uniform` or `Normal` at construction.
#[derive(Clone, Debug, PartialEq)]
pub enum Initializer {
    Constant(f32),
    Uniform {
        low: f32,
        high: f32,
    },
    Normal {
        mean: f32,
        std: f32,
    },
    /// Normal(mean, std) restricted to [low, high] by rejection, as
    /// `torch.nn.init.trunc_normal_` (defaults there: low = -2, high = 2).
    TruncatedNormal {
        mean: f32,
        std: f32,
        low: f32,
        high: f32,
    },
}

impl Initializer {
    pub fn xavier_uniform(dim: usize, gain: f32) -> Self {
        let bound = gain * (6.0 / (2.0 * dim as f32)).sqrt();
        Initializer::Uniform { low: -bound, high: bound }
    }

    pub fn xavier_normal(dim: usize, gain: f32) -> Self {
        let std = gain * (2.0 / (2.0 * dim as f32)).sqrt();
        Initializer::Normal { mean: 0.0, std }
    }

    pub fn kaiming_uniform(dim: usize, gain: f32) -> Self {
        let bound = gain * (3.0 / dim as f32).sqrt();
        Initializer::Uniform { low: -bound, high: bound }
    }

    pub fn kaiming_normal(dim: usize, gain: f32) -> Self {
        let std = gain / (dim as f32).sqrt();
        Initializer::Normal { mean: 0.0, std }
    }

    /// Checks the parameters; the error names the one at fault.
    pub fn validate(&self) -> Result<(), String> {
        let finite = |name: &str, v: f32| {
            if v.is_finite() {
                Ok(())
            } else {
                Err(format!("initializer {name} must be finite, got {v}"))
            }
        };
        match *self {
            Initializer::Constant(v) => finite("value", v),
            Initializer::Uniform { low, high } => {
                finite("low", low)?;
                finite("high", high)?;
                if low > high {
                    return Err(format!("uniform initializer needs low <= high, got {low} > {high}"));
                }
                Ok(())
            }
            Initializer::Normal { mean, std } => {
                finite("mean", mean)?;
                finite("std", std)?;
                if std < 0.0 {
                    return Err(format!("normal initializer needs std >= 0, got {std}"));
                }
                Ok(())
            }
            Initializer::TruncatedNormal { mean, std, low, high } => {
                finite("mean", mean)?;
                finite("std", std)?;
                finite("low", low)?;
                finite("high", high)?;
                if std <= 0.0 || low >= high {
                    return Err(format!(
                        "truncated normal initializer needs std > 0 and low < high, got std={std}, [{low}, {high}]"
                    ));
                }
                if mean + 6.0 * std < low || mean - 6.0 * std > high {
                    return Err(format!(
                        "truncated normal initializer: [{low}, {high}] lies more than 6 std from the mean {mean}"
                    ));
                }
                Ok(())
            }
        }
    }

    /// Fills `out` with the initial embedding of `id`.
    pub fn fill(&self, seed: u64, id: u64, out: &mut [f32]) {
        let mut s = IdStream::new(seed, id);
        match *self {
            Initializer::Constant(v) => out.fill(v),
            Initializer::Uniform { low, high } => {
                for x in out.iter_mut() {
                    *x = low + (high - low) * s.next_unit_f32();
                }
            }
            Initializer::Normal { mean, std } => {
                let mut pairs = out.chunks_exact_mut(2);
                for pair in &mut pairs {
                    let (a, b) = normal_pair(&mut s);
                    pair[0] = mean + std * a as f32;
                    pair[1] = mean + std * b as f32;
                }
                if let [last] = pairs.into_remainder() {
                    *last = mean + std * normal_pair(&mut s).0 as f32;
                }
            }
            Initializer::TruncatedNormal { mean, std, low, high } => {
                for x in out.iter_mut() {
                    // validate() bounds the interval within 6 std of the mean,
                    // so acceptance is at least ~1e-9 per draw only in absurd
                    // configs; the cap keeps a bad config from spinning forever.
                    let mut v = mean;
                    for _ in 0..1000 {
                        let c = mean + std * normal_pair(&mut s).0 as f32;
                        if c >= low && c <= high {
                            v = c;
                            break;
                        }
                    }
                    *x = v;
                }
            }
        }
    }
}

/// Two independent standard normals by Marsaglia's polar method: a point
/// (u, v) uniform in the unit disc (two 32-bit halves of one draw, rejected
/// outside), scaled by sqrt(-2 ln q / q). One `ln` per two values and no
/// trigonometry: new rows of a normal-initialised table cost a third of what
/// Box–Muller with one value per pair did (it was ~30% of a DeepFM lookup).
#[inline]
fn normal_pair(s: &mut IdStream) -> (f64, f64) {
    const SCALE: f64 = 2.0 / 4_294_967_296.0;
    loop {
        let r = s.next_u64();
        let u = (r >> 32) as f64 * SCALE - 1.0;
        let v = (r & 0xffff_ffff) as f64 * SCALE - 1.0;
        let q = u * u + v * v;
        if q > 0.0 && q < 1.0 {
            let f = (-2.0 * q.ln() / q).sqrt();
            return (u * f, v * f);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn moments(init: &Initializer) -> (f64, f64) {
        let mut all = Vec::new();
        let mut row = vec![0.0f32; 16];
        for id in 0..20_000u64 {
            init.fill(3, id, &mut row);
            all.extend(row.iter().map(|&x| x as f64));
        }
        let n = all.len() as f64;
        let mean = all.iter().sum::<f64>() / n;
        let var = all.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n;
        (mean, var.sqrt())
    }

    #[test]
    fn normal_has_requested_moments() {
        let (m, s) = moments(&Initializer::Normal { mean: 0.5, std: 2.0 });
        assert!((m - 0.5).abs() < 0.02, "mean {m}");
        assert!((s - 2.0).abs() < 0.02, "std {s}");
    }

    #[test]
    fn normal_values_follow_the_normal_law_and_pairs_are_uncorrelated() {
        // Kolmogorov-Smirnov against the normal CDF, and the correlation of
        // the two values of a pair (polar method: independent).
        let init = Initializer::Normal { mean: 0.0, std: 1.0 };
        let mut row = vec![0.0f32; 16];
        let mut all = Vec::new();
        let mut corr = 0.0f64;
        for id in 0..5_000u64 {
            init.fill(11, id, &mut row);
            all.extend(row.iter().map(|&x| x as f64));
            corr += row.chunks(2).map(|p| p[0] as f64 * p[1] as f64).sum::<f64>();
        }
        let n = all.len() as f64;
        assert!((corr / (n / 2.0)).abs() < 0.02, "pair correlation {}", corr / (n / 2.0));
        all.sort_by(|a, b| a.partial_cmp(b).unwrap());
        // Normal CDF via erf (Abramowitz-Stegun 7.1.26, |error| < 1.5e-7).
        let cdf = |x: f64| {
            let t = 1.0 / (1.0 + 0.3275911 * x.abs() / std::f64::consts::SQRT_2);
            let y = 1.0
                - (((((1.061405429 * t - 1.453152027) * t) + 1.421413741) * t - 0.284496736) * t + 0.254829592)
                    * t
                    * (-(x * x) / 2.0).exp();
            0.5 * (1.0 + if x >= 0.0 { y } else { -y })
        };
        let d = all.iter().enumerate().map(|(i, &x)| (cdf(x) - i as f64 / n).abs()).fold(0.0, f64::max);
        assert!(d < 1.63 / n.sqrt() * 1.5, "KS distance {d}");
    }

    #[test]
    fn uniform_stays_in_range_and_is_centred() {
        let init = Initializer::Uniform { low: -0.1, high: 0.3 };
        let (m, _) = moments(&init);
        assert!((m - 0.1).abs() < 0.005);
        let mut row = vec![0.0f32; 64];
        for id in 0..1000 {
            init.fill(1, id, &mut row);
            assert!(row.iter().all(|&x| (-0.1..0.3).contains(&x)));
        }
    }

    #[test]
    fn truncated_normal_respects_bounds() {
        let init = Initializer::TruncatedNormal { mean: 0.0, std: 1.0, low: -0.5, high: 0.5 };
        let mut row = vec![0.0f32; 64];
        for id in 0..1000 {
            init.fill(9, id, &mut row);
            assert!(row.iter().all(|&x| (-0.5..=0.5).contains(&x)));
        }
    }

    #[test]
    fn same_seed_and_id_give_the_same_row() {
        let init = Initializer::Normal { mean: 0.0, std: 1.0 };
        let (mut a, mut b, mut c) = (vec![0.0; 8], vec![0.0; 8], vec![0.0; 8]);
        init.fill(5, 77, &mut a);
        init.fill(5, 77, &mut b);
        init.fill(6, 77, &mut c);
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn validate_names_the_bad_parameter() {
        let e = Initializer::Uniform { low: 1.0, high: 0.0 }.validate().unwrap_err();
        assert!(e.contains("low <= high"));
        let e = Initializer::Normal { mean: f32::NAN, std: 1.0 }.validate().unwrap_err();
        assert!(e.contains("mean"));
    }
}
