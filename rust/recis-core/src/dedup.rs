//! De-duplication of a batch of ids without a table: the distinct ids in
//! order of first appearance, each position's index among them, and each
//! distinct id's count. Used where ids are reduced before they travel
//! (the all-to-all of sharded training) rather than looked up.

use crate::hash::mix64;
use rayon::prelude::*;

/// The distinct ids of a batch: `ids[inverse[p]]` is the id at position
/// `p`, and `counts[k]` how many positions hold `ids[k]`.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Distinct {
    pub ids: Vec<u64>,
    pub inverse: Vec<u32>,
    pub counts: Vec<u32>,
}

/// Distinct ids in order of first appearance (an open-addressing set sized
/// to twice the batch; no sort). A batch holds at most `u32::MAX` ids.
pub fn distinct(batch: &[u64]) -> Distinct {
    assert!(batch.len() < u32::MAX as usize, "a batch holds fewer than 2^32 ids");
    let cap = (batch.len() * 2).max(2).next_power_of_two();
    let mask = cap - 1;
    let mut slots = vec![u32::MAX; cap];
    let mut out = Distinct { ids: Vec::new(), inverse: Vec::with_capacity(batch.len()), counts: Vec::new() };
    for &id in batch {
        let mut i = mix64(id) as usize & mask;
        let k = loop {
            let s = slots[i];
            if s == u32::MAX {
                slots[i] = out.ids.len() as u32;
                out.ids.push(id);
                out.counts.push(0);
                break out.ids.len() - 1;
            }
            if out.ids[s as usize] == id {
                break s as usize;
            }
            i = (i + 1) & mask;
        };
        out.counts[k] += 1;
        out.inverse.push(k as u32);
    }
    out
}

/// [`distinct`] of each batch, the batches in parallel.
pub fn distinct_many(batches: &[&[u64]]) -> Result<Vec<Distinct>, String> {
    if let Some(k) = batches.iter().position(|b| b.len() >= u32::MAX as usize) {
        return Err(format!("batches[{k}]: {} ids; a batch holds fewer than 2^32", batches[k].len()));
    }
    Ok(batches.par_iter().map(|b| distinct(b)).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn matches_a_hash_map(batch in proptest::collection::vec(prop_oneof![0u64..20, any::<u64>()], 0..300)) {
            let d = distinct(&batch);
            let mut seen = std::collections::HashMap::new();
            let mut order = Vec::new();
            for &id in &batch {
                *seen.entry(id).or_insert_with(|| { order.push(id); 0u32 }) += 1;
            }
            prop_assert_eq!(&d.ids, &order);
            prop_assert_eq!(d.counts, order.iter().map(|id| seen[id]).collect::<Vec<_>>());
            let back: Vec<u64> = d.inverse.iter().map(|&k| d.ids[k as usize]).collect();
            prop_assert_eq!(back, batch);
        }
    }
}
