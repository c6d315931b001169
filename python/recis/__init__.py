"""RecIS: sparse recommendation training on PyTorch with a Rust core.

The dense part of a model is ordinary PyTorch; the sparse part — the id → row
hash table, its optimizer state, admission and eviction — is RecIS.
"""

# torch's OpenMP workers spin after every parallel op (OMP_WAIT_POLICY
# unset: libgomp's 300,000 pause instructions, milliseconds), on the cores the
# Rust core's threads need. The core parks them during its own calls
# (recis-core's omp module; RECIS_OMP_PARK=0 turns that off), so RecIS no
# longer sets OMP_WAIT_POLICY=PASSIVE, which slows torch's own ops
# (BENCHMARKS.md, "Parking torch's OpenMP team").
from recis import _native
from recis._native import DataError
from recis.ragged import RaggedTensor, from_keyed_jagged, to_keyed_jagged

__version__ = _native.__version__

__all__ = ["DataError", "RaggedTensor", "__version__", "from_keyed_jagged", "to_keyed_jagged"]
