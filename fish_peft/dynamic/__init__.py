"""Masks that move while a model trains: Top-KAST and sparse momentum on whole networks and on FISH diffs (evolving
masks), their Trainer callback and checkpoints, and the periodic averaging of diffs across processes."""

from fish_peft.dynamic.callback import SparseTrainingCallback, load_engine_state
from fish_peft.dynamic.checkpoint import SparseCheckpointError, load_sparse_model, save_sparse_model
from fish_peft.dynamic.densities import layer_densities
from fish_peft.dynamic.engine import MaskEngine, NetworkMaskEngine
from fish_peft.dynamic.evolving_diff import EvolvingDiff
from fish_peft.dynamic.mask_update import evolving_diff_engine
from fish_peft.dynamic.sparse_momentum import SparseMomentum
from fish_peft.dynamic.sparse_momentum_diff import SparseMomentumDiff
from fish_peft.dynamic.static import StaticSparse
from fish_peft.dynamic.targets import SparseTrainingError, find_sparse_weights
from fish_peft.dynamic.topkast import TopKAST
from fish_peft.dynamic.topkast_diff import TopKASTDiff

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
