"""Always-sparse training of whole networks: Top-KAST and sparse momentum mask engines."""

from .callback import SparseTrainingCallback
from .checkpoint import SparseCheckpointError, load_sparse_model, save_sparse_model
from .densities import layer_densities
from .engine import MaskEngine
from .sparse_momentum import SparseMomentum
from .static import StaticSparse
from .targets import SparseTrainingError, find_sparse_weights
from .topkast import TopKAST

__all__ = [
    "MaskEngine",
    "SparseCheckpointError",
    "SparseMomentum",
    "SparseTrainingCallback",
    "SparseTrainingError",
    "StaticSparse",
    "TopKAST",
    "find_sparse_weights",
    "layer_densities",
    "load_sparse_model",
    "save_sparse_model",
]
