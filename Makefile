# Set-up from nothing: a virtualenv in .venv, the Python dependencies, and the
# Rust core built in release mode into it. `make demo` and `make test` each do
# all of it on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# torch 2.13 matches the TorchRec CPU peer of the benchmarks (fbgemm-gpu-cpu 1.8.0).
TORCH  ?= torch==2.13.*

.PHONY: setup build demo test test-rust test-python lint fuzz bench bench-peers clean

$(VENV)/.deps: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)" "maturin>=1.5,<2" numpy safetensors pytest hypothesis "ruff==0.17.6" pyarrow scikit-learn pyfarmhash matplotlib tensorboard waitress \
		'tomli>=2; python_version < "3.11"'
	touch $@

setup: $(VENV)/.deps build

# Incremental: rebuilds the extension only when the Rust sources changed.
build: $(VENV)/.deps
	VIRTUAL_ENV=$(abspath $(VENV)) $(VENV)/bin/maturin develop --release -q

demo: setup
	$(VENV)/bin/recis demo

test: setup lint test-rust test-python

lint:
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets --release -- -D warnings
	$(VENV)/bin/ruff check python tests benches
	$(VENV)/bin/ruff format --check python tests benches

test-rust:
	cargo test --workspace --release

test-python: build
	$(PY) -m pytest -q

# Each fuzz target for a fixed budget (seconds), from its seed corpus; CI
# runs it after `make test` (fuzz/run.sh says how it builds).
FUZZ_SECONDS ?= 45
fuzz:
	fuzz/run.sh $(FUZZ_SECONDS)

# The sparse step against its peers is the shared harness, run from ../shared
# (it needs `make bench-peers` for TorchRec).
PEER_VARIANTS ?= plain_sparseadam,trec_fused_ebc,recis_adam,recis_rowwise_adagrad

bench: setup
	cargo bench -p recis-core --bench table
	@if [ -f ../shared/bench/peer_step.py ]; then \
		cd ../shared && $(abspath $(PY)) bench/peer_step.py --variants $(PEER_VARIANTS) --interleave; \
	else \
		echo "bench: ../shared/bench/peer_step.py is not here; the sparse-step comparison needs the shared harness"; \
	fi

# The TorchRec CPU peer, versions pinned to match torch 2.13.
bench-peers: setup
	$(PY) -m pip install -q "fbgemm-gpu-cpu==1.8.0"
	$(PY) -m pip install -q --no-deps "torchrec==1.9.2"
	$(PY) -m pip install -q tensordict pyvers iopath pyre-extensions typing-inspect mypy-extensions

clean:
	cargo clean
	rm -rf $(VENV)
