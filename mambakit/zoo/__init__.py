"""Pretrained weights: a registry of published checkpoints, checksummed downloads into the cache, upstream
converters and `load_pretrained(NAME or PATH)`.

    from mambakit.zoo import load_pretrained
    model = load_pretrained("vim_tiny_patch16_224.in1k")
    model = load_pretrained("runs/my")          # a run folder of `mambakit <app> train ... --run-dir runs/my`

Weights live in `mambakit_home()/weights/<name>/<filename>`; `MAMBAKIT_OFFLINE=1` uses that cache only.
"""

from mambakit.zoo.pretrained import (PRETRAINED_FORMAT, download_weights, import_object, load_pretrained,
                                     load_weights_file, resolve_weights, save_pretrained, weights_path)
from mambakit.zoo.registry import WeightEntry, get_weights, list_weights, register_weights, unregister_weights

__all__ = [
    "WeightEntry", "register_weights", "unregister_weights", "get_weights", "list_weights",
    "weights_path", "download_weights", "resolve_weights", "load_pretrained", "save_pretrained",
    "load_weights_file", "import_object", "PRETRAINED_FORMAT",
]
