//! A whole ORC file through the training reader (`recis_core::io::validate`:
//! the tail checks, the schema, every stripe of every readable column, both
//! decoders), from arbitrary bytes. It must end in Ok or a data error.
//!
//! Panics inside orc-rust are caught by the reader and become data errors, by
//! design; a panic in RecIS's own code is a bug, and aborts the run here.

#![no_main]

use libfuzzer_sys::fuzz_target;
use recis_core::io::{validate, Limits};

fuzz_target!(|data: &[u8]| {
    recis_core::fuzzing::abort_on_own_panics();
    let path = std::env::temp_dir().join(format!("recis-fuzz-{}.orc", std::process::id()));
    std::fs::write(&path, data).expect("write the input");
    // Small limits keep each input fast; the checks are the same.
    let limits = Limits { max_stripe_rows: 1 << 16, max_stripe_bytes: 1 << 24, max_list_elements: 1 << 16, max_decoded_bytes: 1 << 26 };
    let _ = validate(&[path], limits);
});
