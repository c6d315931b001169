//! The checkpoint files' safetensors header check
//! (`recis_core::ckpt::check_safetensors`, run before anything of a
//! checkpoint is loaded) on arbitrary bytes: Ok or a named error, never a
//! panic, and never an allocation sized by the input's claims.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(h) = recis_core::ckpt::check_safetensors(data) {
        // What it accepted must be consistent with the bytes it was given.
        assert_eq!(8 + h.header_len + h.data_len, data.len() as u64);
        assert!(h.tensors.iter().all(|t| t.begin <= t.end && t.end <= h.data_len));
    }
});
