//! The ORC reader's own decoders (RLE v2, RLE v1, boolean RLE) and its
//! bounded inflate (zstd, zlib, snappy, lz4, lzo chunks) on raw bytes: each
//! must stop at the end of its input or refuse it, never panic or run past
//! its bounds. (lzokay's own panics are caught and refused; see
//! `abort_on_own_panics`.)

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    recis_core::fuzzing::abort_on_own_panics();
    let _ = recis_core::fuzzing::orc_decoders(data);
});
