"""Vision: Vim (Ti/S/B, patch 16 and the stride-8 "+" models) and EfficientVMamba (T/S/B) as timm models with
the published weights, ShuffleMamba's layer-wise shuffle, and training / fine-tuning on image folders
(`mambakit vision ...`). See README.md in this folder.

Importing this package registers the models with timm:

    import mambakit.apps.vision
    import timm
    model = timm.create_model("vim_tiny_patch16_224", pretrained=True, num_classes=10)

The registration runs the model modules, which import timm (and torch, torchvision). So that importing the
package stays cheap where timm is not used (the `mambakit` command line loads every app to list its verbs),
it happens right away when timm is already imported, and otherwise the moment timm is imported, whichever
order the two imports come in. `register_timm_models()` does it explicitly.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
import warnings

__all__ = ["register_timm_models", "TIMM_MODELS"]

TIMM_MODELS = ("vim_tiny_patch16_224", "vim_tiny_patch16_stride8_224", "vim_small_patch16_224",
               "vim_small_patch16_stride8_224", "vim_base_patch16_224",
               "efficient_vmamba_tiny", "efficient_vmamba_small", "efficient_vmamba_base")


def register_timm_models() -> None:
    """Register every vision model with timm (importing the model modules runs their @register_model)."""
    from mambakit.apps.vision import efficient_vmamba, vim  # noqa: F401


class _AfterTimmImport(importlib.abc.MetaPathFinder):
    """A one-shot import hook: when `timm` is first imported, let it load normally, then register our models."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "timm":
            return None
        _remove_hook()
        spec = importlib.util.find_spec("timm")
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module):
            exec_module(module)
            try:
                register_timm_models()
            except Exception as e:  # a broken registration must not break `import timm`
                warnings.warn(f"mambakit.apps.vision: registering the models with timm failed: "
                              f"{type(e).__name__}: {e}")

        spec.loader.exec_module = exec_then_register    # this spec's own loader instance only
        return spec


def _remove_hook() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _AfterTimmImport)]


if "timm" in sys.modules:
    register_timm_models()
elif not any(isinstance(f, _AfterTimmImport) for f in sys.meta_path):
    sys.meta_path.insert(0, _AfterTimmImport())
