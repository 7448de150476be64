"""Computational pathology: whole slides to features (OpenSlide tiling, CLAM's HDF5 layout, batched
extraction), MambaMIL with SR-Mamba and the MIL baselines (mean, max, ABMIL, TransMIL), subtyping and
survival, attention heatmaps, and an embedded cohort built from real slides on the package index."""
