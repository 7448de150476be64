"""The training engine: typed configs, the fit loop (DDP through torchrun, accumulation, precision, EMA,
early stopping), atomic verified checkpoints with exact resume, logs and curves, and the standard verbs.

Import from the submodules (`mambakit.engine.trainer`, `.config`, ...); this package imports nothing heavy."""
