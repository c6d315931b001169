#!/usr/bin/env bash
# Examples: convert the real slices in ../shared/data to ORC (avazu,
# criteo), or generate synthetic data (synthetic); train DeepFM with
# `recis train --config`, evaluate with `recis eval`.
#   examples/run.sh avazu|criteo|synthetic [SHARED_DATA_DIR]
# NPROC=2: train under torchrun, the tables sharded over 2 processes.
# Outputs go to runs/examples/<name>/ (data, checkpoints, log, curves.png).
set -euo pipefail
cd "$(dirname "$0")/.."
name=${1:?usage: examples/run.sh avazu|criteo|synthetic [SHARED_DATA_DIR]}
shared=${2:-../shared/data}
recis=${RECIS:-.venv/bin/recis}
out=runs/examples/$name
rm -rf "$out"
case $name in
  avazu)
    $recis convert --format avazu "$shared/avazu/avazu_train.csv" -o "$out/train"
    $recis convert --format avazu --no-header "$shared/avazu/avazu_dev.csv" -o "$out/valid"
    $recis convert --format avazu --no-header "$shared/avazu/avazu_test.csv" -o "$out/test"
    ;;
  criteo)
    # 900 labelled rows: part-00000 (720) trains, part-00001 (180) evaluates.
    $recis convert --format criteo --rows-per-file 720 "$shared/criteo/criteo_kaggle_head_train.txt" -o "$out/data"
    ;;
  synthetic)
    $recis datagen -o "$out/data" --rows "${ROWS:-400000}" --files 8
    ;;
  *) echo "unknown example $name (avazu, criteo, synthetic)" >&2; exit 2 ;;
esac
if [ "${NPROC:-1}" -gt 1 ]; then
  python=$(dirname "$recis")/python
  $python -m torch.distributed.run --standalone --nproc_per_node "$NPROC" -m recis.cli train --config "examples/$name.toml"
else
  $recis train --config "examples/$name.toml"
fi
if [ "$name" = avazu ]; then
  $recis eval --config "examples/$name.toml" --checkpoint best
else
  $recis eval --config "examples/$name.toml"
fi
