"""Pruning masks at initialization (FORCE, Iterative SNIP, SNIP, GraSP, SynFlow, magnitude, random), of single
weights or of whole channels (`compute_channel_masks`).

Pure PyTorch: imports torch and numpy only, never onnx, onnxruntime, onnx2torch, prefect or click.
"""

from force_core import methods as _methods  # noqa: F401  (registers the built-in methods)
from force_core.channels import (  # also registers the built-in channel methods
    ChannelContext,
    ChannelGroup,
    ChannelMasks,
    ChannelSlice,
    channel_element_masks,
    compute_channel_masks,
)
from force_core.effective import EffectiveSparsity, effective_sparsity
from force_core.engine import PruningContext, compute_masks
from force_core.maskset import MaskSet
from force_core.params import PRUNABLE_LAYER_TYPES, prunable_parameters
from force_core.progress import density_schedule, kept_count
from force_core.registry import available_methods, data_free_methods, get_method, needs_data, register_method
from force_core.select import keep_top_k_
from force_core.train_norm import (
    CALIBRATION_BATCHES,
    TrainNorm,
    add_train_norm,
    calibrate_train_norm,
    fold_train_norm,
    recalibrate_train_norm,
)
from force_core.training import MaskEnforcer, apply_masks_

__all__ = [
    "CALIBRATION_BATCHES",
    "PRUNABLE_LAYER_TYPES",
    "ChannelContext",
    "ChannelGroup",
    "ChannelMasks",
    "ChannelSlice",
    "EffectiveSparsity",
    "MaskEnforcer",
    "MaskSet",
    "PruningContext",
    "TrainNorm",
    "add_train_norm",
    "calibrate_train_norm",
    "recalibrate_train_norm",
    "apply_masks_",
    "available_methods",
    "channel_element_masks",
    "compute_channel_masks",
    "compute_masks",
    "data_free_methods",
    "density_schedule",
    "effective_sparsity",
    "fold_train_norm",
    "get_method",
    "keep_top_k_",
    "kept_count",
    "needs_data",
    "prunable_parameters",
    "register_method",
]
