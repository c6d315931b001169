//! Fused sparse optimizers: the per-row update of embedding and slots.
//!
//! Semantics follow PyTorch's optimizers applied to the touched rows of an
//! equivalent `nn.Embedding` (the test oracle):
//! - `Sgd`: `torch.optim.SGD` (no momentum), weight decay added to the
//!   gradient.
//! - `Adagrad`: `torch.optim.Adagrad` with sparse gradients (`lr_decay`,
//!   `initial_accumulator_value`, `eps`); weight decay, which torch refuses for
//!   sparse gradients, is added to the gradient of touched rows.
//! - `RowWiseAdagrad`: FBGEMM's row-wise Adagrad: one accumulator per row that
//!   grows by the mean squared gradient of the row.
//! - `Adam`: `torch.optim.SparseAdam` (lazy: moments of untouched rows do not
//!   decay), with optional L2 weight decay added to the gradient.
//! - `AdamW`: lazy Adam plus decoupled weight decay on touched rows
//!   (`w *= 1 - lr * weight_decay` before the Adam update, as `torch.optim.AdamW`).
//!
//! `step` is the optimizer's step count, starting at 1, shared by every row of
//! the table (as torch keeps one `step` per parameter).

#[derive(Clone, Debug, PartialEq)]
pub enum SparseOptimizer {
    Sgd { weight_decay: f32 },
    Adagrad { lr_decay: f32, eps: f32, initial_accumulator: f32, weight_decay: f32 },
    RowWiseAdagrad { eps: f32, initial_accumulator: f32, weight_decay: f32 },
    Adam { beta1: f32, beta2: f32, eps: f32, weight_decay: f32 },
    AdamW { beta1: f32, beta2: f32, eps: f32, weight_decay: f32 },
}

impl SparseOptimizer {
    pub fn name(&self) -> &'static str {
        match self {
            SparseOptimizer::Sgd { .. } => "SGD",
            SparseOptimizer::Adagrad { .. } => "Adagrad",
            SparseOptimizer::RowWiseAdagrad { .. } => "RowWiseAdagrad",
            SparseOptimizer::Adam { .. } => "Adam",
            SparseOptimizer::AdamW { .. } => "AdamW",
        }
    }

    /// Slot values per row for an embedding of `dim`.
    pub fn slot_width(&self, dim: usize) -> usize {
        match self {
            SparseOptimizer::Sgd { .. } => 0,
            SparseOptimizer::Adagrad { .. } => dim,
            SparseOptimizer::RowWiseAdagrad { .. } => 1,
            SparseOptimizer::Adam { .. } | SparseOptimizer::AdamW { .. } => 2 * dim,
        }
    }

    /// Initial value of the slots of a new row.
    pub fn slot_init(&self) -> f32 {
        match *self {
            SparseOptimizer::Adagrad { initial_accumulator, .. }
            | SparseOptimizer::RowWiseAdagrad { initial_accumulator, .. } => initial_accumulator,
            _ => 0.0,
        }
    }

    pub fn validate(&self) -> Result<(), String> {
        let nonneg = |name: &str, v: f32| {
            if v.is_finite() && v >= 0.0 {
                Ok(())
            } else {
                Err(format!("{name} must be finite and >= 0, got {v}"))
            }
        };
        let beta = |name: &str, v: f32| {
            if (0.0..1.0).contains(&v) {
                Ok(())
            } else {
                Err(format!("{name} must be in [0, 1), got {v}"))
            }
        };
        match *self {
            SparseOptimizer::Sgd { weight_decay } => nonneg("weight_decay", weight_decay),
            SparseOptimizer::Adagrad { lr_decay, eps, initial_accumulator, weight_decay } => {
                nonneg("lr_decay", lr_decay)?;
                nonneg("eps", eps)?;
                nonneg("initial_accumulator_value", initial_accumulator)?;
                nonneg("weight_decay", weight_decay)
            }
            SparseOptimizer::RowWiseAdagrad { eps, initial_accumulator, weight_decay } => {
                nonneg("eps", eps)?;
                nonneg("initial_accumulator_value", initial_accumulator)?;
                nonneg("weight_decay", weight_decay)
            }
            SparseOptimizer::Adam { beta1, beta2, eps, weight_decay }
            | SparseOptimizer::AdamW { beta1, beta2, eps, weight_decay } => {
                beta("beta1", beta1)?;
                beta("beta2", beta2)?;
                nonneg("eps", eps)?;
                nonneg("weight_decay", weight_decay)
            }
        }
    }

    /// Folds the step-dependent scalars once per step.
    pub fn prepare(&self, lr: f32, step: u64) -> PreparedStep {
        let step = step.max(1);
        let (mut a, mut b) = (0.0f32, 0.0f32);
        match *self {
            SparseOptimizer::Adagrad { lr_decay, .. } => {
                a = lr / (1.0 + (step - 1) as f32 * lr_decay);
            }
            SparseOptimizer::Adam { beta1, beta2, .. } | SparseOptimizer::AdamW { beta1, beta2, .. } => {
                let bc1 = 1.0 - (beta1 as f64).powf(step as f64);
                let bc2 = 1.0 - (beta2 as f64).powf(step as f64);
                a = (lr as f64 * bc2.sqrt() / bc1) as f32;
            }
            _ => {}
        }
        if let SparseOptimizer::AdamW { weight_decay, .. } = *self {
            b = 1.0 - lr * weight_decay;
        }
        PreparedStep { opt: self.clone(), lr, a, b }
    }
}

/// An optimizer with this step's scalars folded in.
pub struct PreparedStep {
    opt: SparseOptimizer,
    lr: f32,
    /// Adagrad: the decayed lr; Adam: the bias-corrected step size.
    a: f32,
    /// AdamW: the decoupled decay factor.
    b: f32,
}

impl PreparedStep {
    /// Updates one row: `w` the embedding, `slots` its optimizer state, `g`
    /// the summed gradient of the row.
    #[inline]
    pub fn update(&self, w: &mut [f32], slots: &mut [f32], g: &[f32]) {
        let d = w.len();
        match self.opt {
            SparseOptimizer::Sgd { weight_decay } => {
                for (x, &gi) in w.iter_mut().zip(g) {
                    *x -= self.lr * (gi + weight_decay * *x);
                }
            }
            SparseOptimizer::Adagrad { eps, weight_decay, .. } => {
                let clr = self.a;
                for ((x, s), &gi) in w.iter_mut().zip(slots.iter_mut()).zip(g) {
                    let gi = gi + weight_decay * *x;
                    *s += gi * gi;
                    *x -= clr * gi / (s.sqrt() + eps);
                }
            }
            SparseOptimizer::RowWiseAdagrad { eps, weight_decay, .. } => {
                let mut sq = 0.0f32;
                for (&x, &gi) in w.iter().zip(g) {
                    let gi = gi + weight_decay * x;
                    sq += gi * gi;
                }
                slots[0] += sq / d as f32;
                let mult = self.lr / (slots[0].sqrt() + eps);
                for (x, &gi) in w.iter_mut().zip(g) {
                    *x -= mult * (gi + weight_decay * *x);
                }
            }
            SparseOptimizer::Adam { beta1, beta2, eps, weight_decay } => {
                adam_row(w, slots, g, beta1, beta2, eps, weight_decay, self.a);
            }
            SparseOptimizer::AdamW { beta1, beta2, eps, .. } => {
                for x in w.iter_mut() {
                    *x *= self.b;
                }
                adam_row(w, slots, g, beta1, beta2, eps, 0.0, self.a);
            }
        }
    }
}

/// Lazy Adam on one row, in the order of operations of torch's `sparse_adam`.
#[allow(clippy::too_many_arguments)]
#[inline]
fn adam_row(
    w: &mut [f32],
    slots: &mut [f32],
    g: &[f32],
    beta1: f32,
    beta2: f32,
    eps: f32,
    weight_decay: f32,
    step_size: f32,
) {
    let d = w.len();
    let (m, v) = slots.split_at_mut(d);
    let (c1, c2) = (1.0 - beta1, 1.0 - beta2);
    for (((wi, mi), vi), &gi) in w.iter_mut().zip(m.iter_mut()).zip(v.iter_mut()).zip(&g[..d]) {
        let gi = gi + weight_decay * *wi;
        *mi += (gi - *mi) * c1;
        *vi += (gi * gi - *vi) * c2;
        *wi += -step_size * (*mi / (vi.sqrt() + eps));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sgd_moves_against_the_gradient() {
        let p = SparseOptimizer::Sgd { weight_decay: 0.0 }.prepare(0.5, 1);
        let mut w = [1.0, 2.0];
        p.update(&mut w, &mut [], &[2.0, -2.0]);
        assert_eq!(w, [0.0, 3.0]);
    }

    #[test]
    fn adam_first_step_is_lr_times_sign() {
        // With bias correction, Adam's first step is lr * g / (|g| + eps').
        let opt = SparseOptimizer::Adam { beta1: 0.9, beta2: 0.999, eps: 0.0, weight_decay: 0.0 };
        let p = opt.prepare(0.1, 1);
        let mut w = [0.0f32, 0.0];
        let mut s = [0.0f32; 4];
        p.update(&mut w, &mut s, &[3.0, -0.5]);
        assert!((w[0] + 0.1).abs() < 1e-6 && (w[1] - 0.1).abs() < 1e-6, "{w:?}");
    }

    #[test]
    fn rowwise_adagrad_keeps_one_accumulator() {
        let opt = SparseOptimizer::RowWiseAdagrad { eps: 0.0, initial_accumulator: 0.0, weight_decay: 0.0 };
        assert_eq!(opt.slot_width(8), 1);
        let p = opt.prepare(1.0, 1);
        let mut w = [0.0f32, 0.0];
        let mut s = [0.0f32];
        p.update(&mut w, &mut s, &[3.0, 4.0]);
        assert!((s[0] - 12.5).abs() < 1e-6);
        assert!((w[0] + 3.0 / 12.5f32.sqrt()).abs() < 1e-6);
    }

    #[test]
    fn validate_names_the_parameter() {
        let e = SparseOptimizer::Adam { beta1: 1.0, beta2: 0.9, eps: 1e-8, weight_decay: 0.0 }.validate().unwrap_err();
        assert!(e.contains("beta1"));
    }
}
