"""The model core: scans, mixers, scan orders, blocks and backbones that every app assembles."""

from mambakit.core.scan import selective_scan, selective_state_update
from mambakit.core.ssd import ssd_scan

__all__ = ["selective_scan", "selective_state_update", "ssd_scan"]
