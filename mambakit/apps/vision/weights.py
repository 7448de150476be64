"""The vision app's published weights for the model zoo (cheap to import: `mambakit zoo list` loads it).

Names are timm's `model.tag`. The files are upstream's, as published on Hugging Face; `convert.py` maps them.
No sha256 is pinned: the Hugging Face file listings (which carry the LFS sha256) were not reachable from
where these entries were written, so downloads warn and print the hash they got. The Vim-B file name
(`hustvl/Vim-base-midclstok/vim_b_midclstok_81p9acc.pth`) comes from downstream code that downloads it, not
from a listing. Vim's files pickle an `argparse.Namespace` (their 'args'); the vision app reads them with
`convert.load_checkpoint_file`, which allows exactly that class and nothing else.
"""

from mambakit.zoo.registry import WeightEntry

__all__ = ["WEIGHTS", "VIM_WEIGHTS", "EFFICIENT_VMAMBA_WEIGHTS"]

_VIM = [  # (timm model, HF repo, file, top-1, top-5)
    ("vim_tiny_patch16_224", "hustvl/Vim-tiny-midclstok", "vim_t_midclstok_76p1acc.pth", 76.1, 93.0),
    ("vim_tiny_patch16_stride8_224", "hustvl/Vim-tiny-midclstok", "vim_t_midclstok_ft_78p3acc.pth", 78.3, 94.2),
    ("vim_small_patch16_224", "hustvl/Vim-small-midclstok", "vim_s_midclstok_80p5acc.pth", 80.5, 95.1),
    ("vim_small_patch16_stride8_224", "hustvl/Vim-small-midclstok", "vim_s_midclstok_ft_81p6acc.pth", 81.6, 95.4),
    ("vim_base_patch16_224", "hustvl/Vim-base-midclstok", "vim_b_midclstok_81p9acc.pth", 81.9, 95.8),
]

VIM_WEIGHTS = [
    WeightEntry(
        name=f"{model}.in1k", app="vision",
        description=f"Vim {model.split('_')[1]}{' (stride 8, fine-tuned)' if 'stride8' in model else ''}, "
                    f"ImageNet-1k top-1 {top1}",
        builder=f"mambakit.apps.vision.vim:{model}", config={"num_classes": 1000},
        urls=[f"https://huggingface.co/{repo}/resolve/main/{filename}"], sha256=None, filename=filename,
        converter="mambakit.apps.vision.convert:vim_from_upstream", licence="Apache-2.0",
        metrics={"imagenet1k/top1": top1, "imagenet1k/top5": top5}, source="hustvl/Vim (arXiv 2401.09417)")
    for model, repo, filename, top1, top5 in _VIM
]

EFFICIENT_VMAMBA_WEIGHTS = [
    WeightEntry(
        name=f"efficient_vmamba_{size}.in1k", app="vision",
        description=f"EfficientVMamba-{size[0].upper()}, ImageNet-1k top-1 {top1}",
        builder=f"mambakit.apps.vision.efficient_vmamba:efficient_vmamba_{size}", config={"num_classes": 1000},
        urls=[f"https://huggingface.co/TerryPei/EfficientVMamba-{size.capitalize()}/resolve/main/"
              f"efficient_vmamba_{size}.ckpt"],
        sha256=None, filename=f"efficient_vmamba_{size}.ckpt",
        converter="mambakit.apps.vision.convert:efficient_vmamba_from_upstream",
        licence="none stated (no licence file upstream)",
        metrics={"imagenet1k/top1": top1}, source="TerryPei/EfficientVMamba (arXiv 2403.09977)")
    for size, top1 in (("tiny", 76.5), ("small", 78.7), ("base", 81.8))
]

WEIGHTS = VIM_WEIGHTS + EFFICIENT_VMAMBA_WEIGHTS
