#!/usr/bin/env bash
# Builds the fuzz targets and runs each for a fixed budget (CI: `make fuzz`).
#
# The build is what `cargo fuzz build --dev --sanitizer none` does (libFuzzer
# with sanitizer-coverage instrumentation, debug assertions, overflow checks),
# spelled out so that CI needs neither cargo-fuzz nor a nightly toolchain.
# With cargo-fuzz installed, `cargo fuzz run orc_read` works here as usual.
#
# Each target starts from its seed corpus (fuzz/corpus/<target>, files from
# `recis datagen`, pyarrow and safetensors) plus fuzz/regressions/<target>
# (inputs that once crashed; rust/recis-core/tests/fuzz_regressions.rs runs
# them in `cargo test`). New corpus entries go to a scratch directory, so the
# repository is not changed; a crash is written to fuzz/artifacts/<target>/
# and fails the run.
#
# Usage: fuzz/run.sh [SECONDS per target, default 60] [TARGET...]
set -euo pipefail
cd "$(dirname "$0")"
secs=${1:-60}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(orc_read orc_decoders ckpt_header)
triple=$(rustc -vV | sed -n 's/^host: //p')
flags=(
    -Cpasses=sancov-module
    -Cllvm-args=-sanitizer-coverage-level=4
    -Cllvm-args=-sanitizer-coverage-inline-8bit-counters
    -Cllvm-args=-sanitizer-coverage-pc-table
    -Cllvm-args=-sanitizer-coverage-trace-compares
    -Cllvm-args=-sanitizer-coverage-stack-depth
    -Cllvm-args=-simplifycfg-branch-fold-threshold=0
    -Cdebug-assertions
    -Coverflow-checks
    --cfg fuzzing
)
# --target keeps the instrumentation off build scripts and proc macros.
RUSTFLAGS="${flags[*]}" cargo build --quiet --target "$triple" --bins
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
for t in "${targets[@]}"; do
    mkdir -p "$scratch/$t" "artifacts/$t"
    seeds=(corpus/$t)
    [ -d regressions/$t ] && seeds+=(regressions/$t)
    echo "fuzz: $t for ${secs}s"
    "target/$triple/debug/$t" "$scratch/$t" "${seeds[@]}" \
        -max_total_time="$secs" -rss_limit_mb=2048 -timeout=10 \
        -artifact_prefix="artifacts/$t/" -print_final_stats=1 2>"$scratch/$t.log" \
        || { tail -40 "$scratch/$t.log"; echo "fuzz: $t failed; the input is in fuzz/artifacts/$t/"; exit 1; }
    grep -E "stat::number_of_executed_units|stat::peak_rss_mb" "$scratch/$t.log" | sed "s/^/fuzz: $t: /"
done
