"""Zoo entries of the feature extractors (imports nothing heavy: `mambakit --help` and `zoo list` read them).

The files cannot be downloaded on a machine without network access; `extract --weights PATH` takes a local
copy, and `--random-weights` runs without (loudly)."""

from __future__ import annotations

__all__ = ["TORCHVISION_RESNET50_URL", "TORCHVISION_RESNET50_HASH_PREFIX", "DEFAULT_WEIGHTS", "zoo_weights"]

TORCHVISION_RESNET50_URL = "https://download.pytorch.org/models/resnet50-0676ba61.pth"
TORCHVISION_RESNET50_HASH_PREFIX = "0676ba61"   # torchvision publishes the first 8 hex digits of the sha256

#: backbone -> the zoo entry used when neither --weights nor --random-weights is given
DEFAULT_WEIGHTS = {
    "resnet50_trunc": "resnet50_trunc.tv_in1k",
    "timm:resnet50.tv_in1k": "timm-resnet50.tv_in1k",
    "timm:vit_small_patch16_224.augreg_in21k_ft_in1k": "timm-vit_small_patch16_224.augreg_in21k_ft_in1k",
}


def _timm_entry(model_name: str, description: str, licence: str):
    from mambakit.zoo import WeightEntry

    return WeightEntry(
        name=f"timm-{model_name}", app="pathology", description=f"{description} (--backbone timm:{model_name})",
        builder="mambakit.apps.pathology.features:timm_backbone", config={"model_name": model_name},
        urls=[f"https://huggingface.co/timm/{model_name}/resolve/main/model.safetensors"], sha256=None,
        filename="model.safetensors", converter="mambakit.apps.pathology.features:timm_without_head",
        licence=licence, source=f"hf-hub:timm/{model_name}")


def zoo_weights() -> list:
    from mambakit.zoo import WeightEntry

    return [
        WeightEntry(
            name="resnet50_trunc.tv_in1k", app="pathology",
            description="CLAM's resnet50_trunc (ResNet-50 to layer3 + avg pool, 1024-d), torchvision ImageNet-1k V1",
            builder="mambakit.apps.pathology.features:resnet50_trunc", config={},
            urls=[TORCHVISION_RESNET50_URL], sha256=None, filename="resnet50-0676ba61.pth",
            converter="mambakit.apps.pathology.features:resnet50_trunc_from_torchvision",
            licence="BSD-3-Clause (torchvision)",
            source=f"torchvision ResNet50_Weights.IMAGENET1K_V1 (published sha256 prefix {TORCHVISION_RESNET50_HASH_PREFIX})"),
        _timm_entry("resnet50.tv_in1k", "timm ResNet-50 (torchvision weights), pooled 2048-d", "BSD-3-Clause"),
        _timm_entry("vit_small_patch16_224.augreg_in21k_ft_in1k", "timm ViT-S/16 AugReg IN-21k -> IN-1k, 384-d",
                    "Apache-2.0"),
    ]
