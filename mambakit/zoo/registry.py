"""The registry of pretrained weights.

An app declares each published checkpoint next to its model and lists it in `App(weights=[...])`:

    WeightEntry(
        name="vim_tiny_patch16_224.in1k", app="vision", description="Vim-T, ImageNet-1k top-1 76.1",
        builder="mambakit.apps.vision.models:vim_tiny_patch16_224", config={"num_classes": 1000},
        urls=["https://huggingface.co/hustvl/Vim-tiny-midclstok/resolve/main/vim_t_midclstok_76p1acc.pth"],
        sha256="...", filename="vim_t_midclstok_76p1acc.pth",
        converter="mambakit.apps.vision.convert:vim_from_upstream",
        licence="Apache-2.0", metrics={"imagenet1k/top1": 76.1}, source="hustvl/Vim")

`builder(**config)` builds the model; `converter(loaded_file)` maps the upstream checkpoint to our state
dict (None: the file already holds our state dict, possibly under a "model" / "state_dict" key).
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field
from difflib import get_close_matches
from typing import Any, Callable, Iterable, Mapping

from mambakit.data.download import _normalise_sha256
from mambakit.data.registry import UnknownEntryError, load_plugins

__all__ = ["WeightEntry", "register_weights", "unregister_weights", "add_weights_provider", "set_app_catalogue",
           "installed_apps", "get_weights", "list_weights"]

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_IMPORT_PATH = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*")


@dataclass
class WeightEntry:
    name: str
    app: str
    description: str
    builder: str                      # "module:function"; builder(**config) -> nn.Module
    config: dict
    urls: list[str]
    sha256: str | None                # of the file as published; None only when it could not be pinned
    filename: str                     # the name in the cache: mambakit_home()/weights/<name>/<filename>
    converter: str | None = None      # "module:function"; converter(loaded upstream object) -> our state dict
    licence: str = ""
    metrics: dict = field(default_factory=dict)   # published numbers, e.g. {"imagenet1k/top1": 76.1}
    source: str = ""                  # paper / repository the weights come from
    # Set only when the file cannot be read with torch.load(weights_only=True) because upstream pickled
    # Python objects into it (an argparse.Namespace, a custom class). The reason is printed at load time;
    # full unpickling runs code from the file, so it is allowed only together with a pinned sha256.
    pickle_reason: str | None = None

    def __post_init__(self):
        if not _NAME.fullmatch(self.name or ""):
            raise ValueError(f"WeightEntry: name must match {_NAME.pattern}, got {self.name!r}")
        where = f"WeightEntry {self.name!r}"
        for attr in ("builder",) + (("converter",) if self.converter is not None else ()):
            if not _IMPORT_PATH.fullmatch(getattr(self, attr) or ""):
                raise ValueError(f"{where}: {attr} must be 'module:function', got {getattr(self, attr)!r}")
        if not isinstance(self.config, dict):
            raise TypeError(f"{where}: config must be a dict, got {type(self.config).__name__}")
        if not self.filename or "/" in self.filename or self.filename in (".", ".."):
            raise ValueError(f"{where}: filename must be a plain file name, got {self.filename!r}")
        self.urls = list(self.urls)
        self.sha256 = _normalise_sha256(self.sha256, where)
        if self.pickle_reason and self.sha256 is None:
            raise ValueError(f"{where}: pickle_reason (full unpickling) needs a pinned sha256")


_WEIGHTS: dict[str, WeightEntry] = {}


def register_weights(entry: WeightEntry, *, replace: bool = False) -> WeightEntry:
    """Add `entry`; an equal entry again is a no-op, a different one under a taken name is an error."""
    if not isinstance(entry, WeightEntry):
        raise TypeError(f"register_weights expects a WeightEntry, got {type(entry).__name__}")
    old = _WEIGHTS.get(entry.name)
    if old is not None and old != entry and not replace:
        raise ValueError(f"weights {entry.name!r} are already registered (by app {old.app!r}); "
                         f"pass replace=True to override them")
    _WEIGHTS[entry.name] = entry
    return entry


def unregister_weights(name: str) -> None:
    _WEIGHTS.pop(name, None)


# The entries are declared by the apps, a layer above this one, which this layer never imports: the layer
# that knows the apps adds providers (see mambakit.data.registry.load_plugins for how a fresh process gets
# them), and a lookup that misses or a full listing asks them.
_PROVIDERS: list[Callable[[], Iterable[WeightEntry]]] = []
# Training checkpoints name the app that wrote them, and that app rebuilds their model: the app layer tells
# this one which apps are installed (name -> App) and which failed to load (name -> reason).
_APP_CATALOGUE: Callable[[], tuple[Mapping[str, Any], Mapping[str, str]]] | None = None


def add_weights_provider(provider: Callable[[], Iterable[WeightEntry]]) -> None:
    """`provider()` yields WeightEntry objects; they are registered on the first lookup that misses and on
    every `list_weights()`. Adding the same provider twice is a no-op."""
    if provider not in _PROVIDERS:
        _PROVIDERS.append(provider)


def set_app_catalogue(catalogue: Callable[[], tuple[Mapping[str, Any], Mapping[str, str]]]) -> None:
    """`catalogue()` returns (installed apps by name, apps that failed to load: name -> reason)."""
    global _APP_CATALOGUE
    _APP_CATALOGUE = catalogue


def installed_apps() -> tuple[dict[str, Any], dict[str, str]]:
    """(installed apps by name, broken apps: name -> reason), as the app layer discovers them."""
    load_plugins()
    if _APP_CATALOGUE is None:
        return {}, {}
    apps, broken = _APP_CATALOGUE()
    return dict(apps), dict(broken)


def _collect_from_providers() -> None:
    load_plugins()
    for provider in list(_PROVIDERS):
        for entry in provider():
            try:
                register_weights(entry)
            except (TypeError, ValueError) as e:
                warnings.warn(f"app {getattr(entry, 'app', '?')!r}: weights not registered: {e}")


def get_weights(name: str) -> WeightEntry:
    if name not in _WEIGHTS:
        _collect_from_providers()
    try:
        return _WEIGHTS[name]
    except KeyError:
        close = get_close_matches(name, list(_WEIGHTS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise UnknownEntryError(f"unknown weights {name!r}{hint}; registered: "
                                f"{', '.join(sorted(_WEIGHTS)) or 'none'}") from None


def is_registered(name: str) -> bool:
    try:
        get_weights(name)
        return True
    except KeyError:
        return False


def list_weights() -> list[WeightEntry]:
    _collect_from_providers()
    return sorted(_WEIGHTS.values(), key=lambda e: (e.app, e.name))
