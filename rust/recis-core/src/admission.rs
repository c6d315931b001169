//! Admission: whether an id seen for the first time gets a row.
//!
//! An id that is not admitted reads as its initial value (or zeros), stores
//! nothing and receives no update. Counting for `MinCount` is memory-bounded
//! (a count-min sketch of a fixed size) and decays: every `decay_every` steps
//! all counters are halved, so ids that were frequent long ago fade.

use crate::hash::{mix64, IdStream};
use std::sync::atomic::{AtomicU32, Ordering};

#[derive(Clone, Debug, PartialEq)]
pub enum AdmissionPolicy {
    Always,
    /// Admit once the (estimated) number of sightings reaches `k`.
    MinCount {
        k: u32,
        /// Counters per sketch row (rounded up to a power of two).
        width: usize,
        /// Sketch rows (independent hashes).
        depth: usize,
        /// Halve every counter each time this many steps pass (0: never).
        decay_every: u64,
    },
    /// Admit each sighting with probability `p` (deterministic in
    /// (seed, id, step)).
    Probability {
        p: f64,
    },
}

impl AdmissionPolicy {
    pub fn min_count(k: u32) -> Self {
        AdmissionPolicy::MinCount { k, width: 1 << 18, depth: 4, decay_every: 0 }
    }

    pub fn validate(&self) -> Result<(), String> {
        match *self {
            AdmissionPolicy::Always => Ok(()),
            AdmissionPolicy::MinCount { k, width, depth, .. } => {
                if k == 0 {
                    return Err("admission min_count k must be >= 1".into());
                }
                if width == 0 || depth == 0 || depth > 16 {
                    return Err(format!(
                        "admission sketch needs width >= 1 and 1 <= depth <= 16, got width={width}, depth={depth}"
                    ));
                }
                Ok(())
            }
            AdmissionPolicy::Probability { p } => {
                if !(0.0..=1.0).contains(&p) {
                    return Err(format!("admission probability p must be in [0, 1], got {p}"));
                }
                Ok(())
            }
        }
    }
}

/// Runtime state of a policy.
pub struct Admission {
    policy: AdmissionPolicy,
    seed: u64,
    sketch: Vec<AtomicU32>,
    mask: usize,
    depth: usize,
    last_decay_epoch: AtomicU32,
}

impl Admission {
    pub fn new(policy: AdmissionPolicy, seed: u64) -> Self {
        let (width, depth) = match policy {
            AdmissionPolicy::MinCount { width, depth, .. } => (width.next_power_of_two(), depth),
            _ => (0, 0),
        };
        Admission {
            policy,
            seed,
            sketch: (0..width * depth).map(|_| AtomicU32::new(0)).collect(),
            mask: width.saturating_sub(1),
            depth,
            last_decay_epoch: AtomicU32::new(0),
        }
    }

    pub fn policy(&self) -> &AdmissionPolicy {
        &self.policy
    }

    pub fn is_always(&self) -> bool {
        matches!(self.policy, AdmissionPolicy::Always)
    }

    /// Records `count` sightings of a not-yet-stored id at `step` and says
    /// whether it is admitted now. Safe to call from many threads.
    pub fn observe(&self, id: u64, count: u32, step: u64) -> bool {
        match self.policy {
            AdmissionPolicy::Always => true,
            AdmissionPolicy::Probability { p } => {
                // Each of the `count` sightings is an independent trial.
                let mut s = IdStream::new(self.seed ^ 0xad31_5510, id ^ mix64(step));
                (0..count.max(1)).any(|_| (s.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64) < p)
            }
            AdmissionPolicy::MinCount { k, .. } => {
                let width = self.mask + 1;
                let mut est = u32::MAX;
                let h = mix64(id ^ self.seed.rotate_left(17));
                for d in 0..self.depth {
                    let idx = d * width + (mix64(h.wrapping_add(d as u64)) as usize & self.mask);
                    let prev = self.sketch[idx]
                        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |c| Some(c.saturating_add(count)))
                        .unwrap_or(0);
                    est = est.min(prev.saturating_add(count));
                }
                est >= k
            }
        }
    }

    /// Halves the sketch when a decay boundary has passed since the last call.
    /// Needs no other caller running `observe` for an exact halving, which the
    /// table guarantees by calling it under its exclusive lock.
    pub fn maybe_decay(&self, step: u64) {
        if let AdmissionPolicy::MinCount { decay_every, .. } = self.policy {
            if decay_every == 0 {
                return;
            }
            let epoch = (step / decay_every).min(u32::MAX as u64) as u32;
            let last = self.last_decay_epoch.swap(epoch, Ordering::Relaxed);
            if epoch > last {
                let halvings = (epoch - last).min(32);
                for c in &self.sketch {
                    let v = c.load(Ordering::Relaxed);
                    c.store(v.checked_shr(halvings).unwrap_or(0), Ordering::Relaxed);
                }
            }
        }
    }

    /// Whether a decay is due at `step` (cheap, lock-free check).
    pub fn decay_due(&self, step: u64) -> bool {
        match self.policy {
            AdmissionPolicy::MinCount { decay_every, .. } if decay_every > 0 => {
                (step / decay_every).min(u32::MAX as u64) as u32 > self.last_decay_epoch.load(Ordering::Relaxed)
            }
            _ => false,
        }
    }

    pub fn memory_bytes(&self) -> usize {
        self.sketch.len() * 4
    }

    /// The sketch counters, for checkpoints.
    pub fn export_counters(&self) -> (Vec<u32>, u32) {
        (self.sketch.iter().map(|c| c.load(Ordering::Relaxed)).collect(), self.last_decay_epoch.load(Ordering::Relaxed))
    }

    pub fn import_counters(&self, counters: &[u32], last_decay_epoch: u32) -> Result<(), String> {
        if counters.len() != self.sketch.len() {
            return Err(format!(
                "admission sketch has {} counters, checkpoint has {}",
                self.sketch.len(),
                counters.len()
            ));
        }
        for (c, &v) in self.sketch.iter().zip(counters) {
            c.store(v, Ordering::Relaxed);
        }
        self.last_decay_epoch.store(last_decay_epoch, Ordering::Relaxed);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn min_count_admits_on_the_kth_sighting() {
        let a = Admission::new(AdmissionPolicy::min_count(3), 1);
        assert!(!a.observe(10, 1, 0));
        assert!(!a.observe(10, 1, 0));
        assert!(a.observe(10, 1, 0));
        // Several sightings in one batch count together.
        assert!(a.observe(11, 3, 0));
    }

    #[test]
    fn decay_halves_counts() {
        let a = Admission::new(AdmissionPolicy::MinCount { k: 4, width: 1024, depth: 2, decay_every: 10 }, 1);
        assert!(!a.observe(5, 3, 0));
        a.maybe_decay(10); // 3 -> 1
        assert!(!a.observe(5, 2, 10)); // 1 + 2 = 3 < 4
        assert!(a.observe(5, 1, 10)); // 4
    }

    #[test]
    fn probability_admits_about_p() {
        let a = Admission::new(AdmissionPolicy::Probability { p: 0.25 }, 3);
        let admitted = (0..20_000u64).filter(|&id| a.observe(id, 1, 0)).count();
        assert!((4500..5500).contains(&admitted), "{admitted}");
        let none = Admission::new(AdmissionPolicy::Probability { p: 0.0 }, 3);
        assert!((0..1000u64).all(|id| !none.observe(id, 5, 1)));
    }
}
