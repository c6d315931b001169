//! Every input that once crashed a fuzz target (`fuzz/regressions/<target>`)
//! runs through that target's function here, in `cargo test`, and so does
//! every seed of the corpora (`fuzz/corpus/<target>`), whose files must
//! read cleanly. The fuzzing itself is `fuzz/run.sh`.

use recis_core::io::{validate, Limits};
use std::path::{Path, PathBuf};

fn inputs(kind: &str, target: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz").join(kind).join(target);
    let Ok(entries) = std::fs::read_dir(&dir) else { return Vec::new() };
    let mut v: Vec<PathBuf> = entries.map(|e| e.unwrap().path()).collect();
    v.sort();
    v
}

#[test]
fn regressions_of_orc_decoders_are_refused_without_a_panic() {
    let files = inputs("regressions", "orc_decoders");
    assert!(!files.is_empty(), "fuzz/regressions/orc_decoders holds the LZO crash");
    for f in files {
        recis_core::fuzzing::orc_decoders(&std::fs::read(&f).unwrap());
    }
}

#[test]
fn the_orc_seed_corpus_reads_cleanly() {
    let files = inputs("corpus", "orc_read");
    assert!(files.len() >= 5, "{files:?}");
    for f in files.iter().chain(inputs("regressions", "orc_read").iter()) {
        let rows = validate(std::slice::from_ref(f), Limits::default());
        if f.to_string_lossy().contains("/corpus/") {
            assert!(rows.as_ref().is_ok_and(|&n| n > 0), "{}: {rows:?}", f.display());
        }
    }
}

#[test]
fn the_checkpoint_seed_corpus_passes_the_header_check() {
    let files = inputs("corpus", "ckpt_header");
    assert!(!files.is_empty());
    for f in files {
        let h = recis_core::ckpt::check_safetensors(&std::fs::read(&f).unwrap());
        assert!(h.is_ok(), "{}: {h:?}", f.display());
    }
}
