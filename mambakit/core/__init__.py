"""The model core: scans, mixers, scan orders, blocks and backbones that every app assembles.

Shapes are (batch, length, d_model) at every module's boundary; inside the Mamba-1 mixers activations are
(batch, d, length) tensors, token-major memory on the CPU and channel-major on CUDA (see
`mambakit.core.mamba` and `mambakit.core.layout`).
"""

from mambakit.core.block import Block, DropPath, GatedMLP, MixerModel, create_block, drop_path_schedule, init_weights
from mambakit.core.cache import InferenceParams
from mambakit.core.lm import MambaConfig, MambaLMHeadModel
from mambakit.core.mamba import Mamba, set_memory_efficient
from mambakit.core.mamba2 import Mamba2
from mambakit.core.multi_order import MultiOrderMamba, PerOrderMamba
from mambakit.core.norm import RMSNorm, RMSNormGated
from mambakit.core.orders import (ATROUS_2X2, CROSS_SCAN, PCM_ORDERS, SNAKE_ORDERS, AtrousLattice, Flip, GridOrder,
                                  Identity, OrderIndices, PointOrder, RandomShuffle, ScanOrder, StrideOrder,
                                  order_names, reorder, restore, scan_order)
from mambakit.core.scan import selective_scan, selective_state_update
from mambakit.core.ssd import ssd_scan

__all__ = [
    "selective_scan", "selective_state_update", "ssd_scan",
    "Mamba", "Mamba2", "MultiOrderMamba", "PerOrderMamba", "InferenceParams", "set_memory_efficient",
    "RMSNorm", "RMSNormGated", "Block", "MixerModel", "GatedMLP", "DropPath", "create_block", "init_weights",
    "drop_path_schedule", "MambaConfig", "MambaLMHeadModel",
    "ScanOrder", "OrderIndices", "Identity", "Flip", "StrideOrder", "RandomShuffle", "GridOrder", "AtrousLattice",
    "PointOrder", "scan_order", "order_names", "reorder", "restore",
    "CROSS_SCAN", "ATROUS_2X2", "SNAKE_ORDERS", "PCM_ORDERS",
]
