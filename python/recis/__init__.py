"""RecIS: sparse recommendation training on PyTorch with a Rust core.

The dense part of a model is ordinary PyTorch; the sparse part — the id → row
hash table, its optimizer state, admission and eviction — is RecIS.
"""

import os
import sys

# torch's OpenMP workers spin (OMP_WAIT_POLICY unset: libgomp's default of
# 300,000 pause instructions, milliseconds on current Xeons) after every
# parallel op, on the cores the Rust core's threads need right after the
# backward. libgomp reads the policy once, when torch loads it: import recis
# before torch (the recis CLI does), or export OMP_WAIT_POLICY=PASSIVE.
# BENCHMARKS.md measures both.
if "torch" not in sys.modules:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from recis import _native  # noqa: E402
from recis._native import DataError  # noqa: E402
from recis.ragged import RaggedTensor, from_keyed_jagged, to_keyed_jagged  # noqa: E402

__version__ = _native.__version__

__all__ = ["DataError", "RaggedTensor", "__version__", "from_keyed_jagged", "to_keyed_jagged"]
