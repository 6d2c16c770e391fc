"""Dynamic sparse training: Top-KAST and sparse momentum on whole networks and on FISH diffs (evolving masks)."""

from .callback import SparseTrainingCallback, load_engine_state
from .checkpoint import SparseCheckpointError, load_sparse_model, save_sparse_model
from .densities import layer_densities
from .engine import MaskEngine, NetworkMaskEngine
from .evolving_diff import EvolvingDiff
from .mask_update import evolving_diff_engine
from .sparse_momentum import SparseMomentum
from .sparse_momentum_diff import SparseMomentumDiff
from .static import StaticSparse
from .targets import SparseTrainingError, find_sparse_weights
from .topkast import TopKAST
from .topkast_diff import TopKASTDiff

__all__ = [
    "EvolvingDiff",
    "MaskEngine",
    "NetworkMaskEngine",
    "SparseCheckpointError",
    "SparseMomentum",
    "SparseMomentumDiff",
    "SparseTrainingCallback",
    "SparseTrainingError",
    "StaticSparse",
    "TopKAST",
    "TopKASTDiff",
    "evolving_diff_engine",
    "find_sparse_weights",
    "layer_densities",
    "load_engine_state",
    "load_sparse_model",
    "save_sparse_model",
]
