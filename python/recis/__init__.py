"""RecIS: sparse recommendation training on PyTorch with a Rust core.

The dense part of a model is ordinary PyTorch; the sparse part — the id → row
hash table, its optimizer state, admission and eviction — is RecIS.
"""

from recis import _native
from recis.ragged import RaggedTensor, from_keyed_jagged, to_keyed_jagged

__version__ = _native.__version__

__all__ = ["RaggedTensor", "__version__", "from_keyed_jagged", "to_keyed_jagged"]
