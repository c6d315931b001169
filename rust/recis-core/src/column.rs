//! The buffers a read delivers a column in, shared by the reader (`io.rs`)
//! and our ORC decoder (`orc_decode.rs`) so that neither imports the other:
//! [`Values`], one contiguous buffer of a column's elements, and
//! [`Column`], its values plus, for a list column, `rows + 1` offsets into
//! them. Public as `recis_core::io::{Column, Values}`.
//!
//! Invariants: offsets (of lists, and of `Values::Bytes`) start at 0 and
//! never decrease; a column keeps one `Values` variant for its whole read,
//! so appending one part to another never mixes variants.

/// Values of one column for a run of rows.
#[derive(Debug, Clone, PartialEq)]
pub enum Values {
    Int(Vec<i64>),
    Float32(Vec<f32>),
    Float64(Vec<f64>),
    /// Raw strings: concatenated bytes and `n + 1` offsets.
    Bytes {
        data: Vec<u8>,
        offsets: Vec<i64>,
    },
}

impl Values {
    pub(crate) fn empty_like(&self) -> Values {
        match self {
            Values::Int(_) => Values::Int(Vec::new()),
            Values::Float32(_) => Values::Float32(Vec::new()),
            Values::Float64(_) => Values::Float64(Vec::new()),
            Values::Bytes { .. } => Values::Bytes { data: Vec::new(), offsets: vec![0] },
        }
    }

    /// Appends elements `a..b` of `other` (same variant).
    pub(crate) fn extend_from(&mut self, other: &Values, a: usize, b: usize) {
        match (self, other) {
            (Values::Int(v), Values::Int(o)) => v.extend_from_slice(&o[a..b]),
            (Values::Float32(v), Values::Float32(o)) => v.extend_from_slice(&o[a..b]),
            (Values::Float64(v), Values::Float64(o)) => v.extend_from_slice(&o[a..b]),
            (Values::Bytes { data, offsets }, Values::Bytes { data: od, offsets: oo }) => {
                let base = *offsets.last().unwrap() - oo[a];
                data.extend_from_slice(&od[oo[a] as usize..oo[b] as usize]);
                offsets.extend(oo[a + 1..=b].iter().map(|&x| x + base));
            }
            _ => unreachable!("columns keep one variant"),
        }
    }
}

/// One column of a batch: values, and for list columns `rows + 1` offsets.
#[derive(Debug, Clone, PartialEq)]
pub struct Column {
    pub values: Values,
    pub offsets: Option<Vec<i64>>,
}

impl Column {
    /// Bytes its buffers hold (values and offsets).
    pub fn nbytes(&self) -> u64 {
        let values = match &self.values {
            Values::Int(v) => v.len() * 8,
            Values::Float32(v) => v.len() * 4,
            Values::Float64(v) => v.len() * 8,
            Values::Bytes { data, offsets } => data.len() + offsets.len() * 8,
        };
        (values + self.offsets.as_ref().map_or(0, |o| o.len() * 8)) as u64
    }

    pub(crate) fn empty_like(&self) -> Column {
        Column { values: self.values.empty_like(), offsets: self.offsets.as_ref().map(|_| vec![0]) }
    }

    /// Appends rows `a..b` of `other`.
    pub(crate) fn extend_rows(&mut self, other: &Column, a: usize, b: usize) {
        match (&mut self.offsets, &other.offsets) {
            (Some(off), Some(oo)) => {
                let (ea, eb) = (oo[a] as usize, oo[b] as usize);
                let base = *off.last().unwrap() - oo[a];
                off.extend(oo[a + 1..=b].iter().map(|&x| x + base));
                self.values.extend_from(&other.values, ea, eb);
            }
            _ => self.values.extend_from(&other.values, a, b),
        }
    }
}
