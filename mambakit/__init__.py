"""mambakit: one selective state space (Mamba) library for every domain."""

__version__ = "0.1.0"
