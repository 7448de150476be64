"""Download, verify, convert and load pretrained weights.

    model = load_pretrained("vim_tiny_patch16_224.in1k")            # a registered name
    model = load_pretrained("runs/x/model.pt")                      # a file written by save_pretrained
    model = load_pretrained("runs/x")                               # a run folder of `mambakit <app> train`
    model = load_pretrained("runs/x/checkpoints/step-00000120.pt", use_ema=True)   # one training checkpoint
    model = load_pretrained("sd.pt", builder="pkg.mod:fn", dim=64)  # a bare state dict for a named builder

Files are read with `torch.load(weights_only=True)` (or safetensors), which cannot run code. A registered
upstream file that pickles Python objects is loaded in full only when its entry says why (`pickle_reason`)
and pins its sha256; for a user's own file, `trust_pickle=True` says the user trusts it.
"""

from __future__ import annotations

import importlib
import os
import pickle
import shutil
import sys
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mambakit.data.cache import file_lock, is_offline, mambakit_home, sha256_file
from mambakit.data.download import (ChecksumError, DownloadError, OfflineError, UnverifiedDownloadWarning,
                                    download_url)
from mambakit.data.registry import UnknownEntryError
from mambakit.zoo.registry import WeightEntry, get_weights, is_registered

__all__ = ["weights_path", "download_weights", "resolve_weights", "load_pretrained", "save_pretrained",
           "load_weights_file", "import_object", "PRETRAINED_FORMAT"]

#: Marks a file written by `save_pretrained`: it carries its builder and config, so it loads on its own.
PRETRAINED_FORMAT = "mambakit.pretrained/1"


def weights_path(entry: WeightEntry) -> Path:
    return mambakit_home() / "weights" / entry.name / entry.filename


def download_weights(name: str, *, progress: bool = True, local_path: str | os.PathLike | None = None) -> Path:
    """The cached, verified file of registered weights `name` (downloaded on first use).

    local_path: take the weights from this file (or the file of the entry's name in this folder) instead of
    the network: its sha256 is checked against the pinned one before it is copied into the cache (an
    unpinned entry's file is accepted with a warning that prints its sha256), `mambakit zoo download NAME
    --from FILE`. A cached file is checked against a pinned sha256 before it is used; one that differs is
    replaced. When the weights cannot be downloaded, the error says which URL to fetch elsewhere and where
    the file goes."""
    entry = get_weights(name)
    dest = weights_path(entry)
    if local_path is not None:
        return _take_local_weights(entry, Path(local_path).expanduser(), dest)
    if dest.is_file():
        if entry.sha256 is None or (actual := sha256_file(dest)) == entry.sha256:
            return dest
        warnings.warn(f"{dest}: sha256 {actual} is not the pinned {entry.sha256} of weights {name!r}; removed "
                      f"it, fetching the weights again")
        dest.unlink(missing_ok=True)
    if is_offline():
        raise OfflineError(f"MAMBAKIT_OFFLINE=1: weights {name!r} are not in the cache (expected at {dest}). "
                           f"{_how_to_get(entry, dest)}")
    if not entry.urls:
        raise DownloadError(f"weights {name!r} list no URL; obtain {entry.filename} from {entry.source or 'upstream'} "
                            f"and run `mambakit zoo download {name} --from FILE` (or pass its path to load_pretrained)")
    failures: list[DownloadError] = []
    for url in entry.urls:
        try:
            return download_url(url, dest, entry.sha256, progress=progress)
        except DownloadError as e:
            failures.append(e)
    if all(isinstance(e, ChecksumError) for e in failures):
        if len(failures) == 1:
            raise failures[0]
        raise ChecksumError(f"weights {name!r}: every URL failed:\n" + "\n".join(f"  - {e}" for e in failures))
    tried = failures[0] if len(failures) == 1 else "; ".join(f"({i}) {e}" for i, e in enumerate(failures, 1))
    raise DownloadError(f"weights {name!r}: {tried}. {_how_to_get(entry, dest)}")


def _how_to_get(entry: WeightEntry, dest: Path) -> str:
    """What to do where the weights cannot be downloaded: the URL, the exact cache path, and the check."""
    source = " or ".join(entry.urls) if entry.urls else f"{entry.filename} ({entry.source or 'upstream'})"
    check = (f"it is checked against the pinned sha256 {entry.sha256}" if entry.sha256 else
             "no sha256 is pinned for these weights, so it is accepted as is and its sha256 printed for you to "
             "compare with the publisher's")
    return (f"To get them: download {source} on a machine that can reach it, then run `mambakit zoo download "
            f"{entry.name} --from FILE`, or put the file at {dest}; {check}")


def _take_local_weights(entry: WeightEntry, path: Path, dest: Path) -> Path:
    """Copy a user-supplied file of `entry` into the cache, after checking its sha256 (the file is left
    untouched, whatever the check says)."""
    if path.is_dir():
        path = path / entry.filename
    if not path.is_file():
        raise DownloadError(f"--from {path}: no such file (weights {entry.name!r} are the file {entry.filename}"
                            f"{' from ' + entry.urls[0] if entry.urls else ''})")
    actual = sha256_file(path)
    if entry.sha256 is not None and actual != entry.sha256:
        raise ChecksumError(f"--from {path}: its sha256 {actual} is not the pinned {entry.sha256} of weights "
                            f"{entry.name!r}, so it was not taken (is it {entry.filename}"
                            f"{' from ' + entry.urls[0] if entry.urls else ''}, complete?)")
    if entry.sha256 is None:
        warnings.warn(f"UNVERIFIED weights: {entry.name!r} pin no sha256; {path} is taken as is. Its sha256 is "
                      f"{actual}: compare it with the publisher's.", UnverifiedDownloadWarning, stacklevel=3)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(dest.with_name(f".{dest.name}.lock")):
        fd, part = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
        os.close(fd)
        try:
            shutil.copyfile(path, part)
            os.replace(part, dest)
        finally:
            Path(part).unlink(missing_ok=True)
    print(f"mambakit: weights {entry.name!r} taken from {path} into {dest}", file=sys.stderr)
    return dest


def resolve_weights(name_or_path: str | os.PathLike) -> Path:
    """An existing file as is; otherwise a registered name, downloaded if needed."""
    if isinstance(name_or_path, os.PathLike) or Path(name_or_path).is_file():
        path = Path(name_or_path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such weights file")
        return path
    if is_registered(name_or_path):
        return download_weights(name_or_path)
    try:
        get_weights(name_or_path)
    except UnknownEntryError as e:
        raise UnknownEntryError(f"{name_or_path!r} is neither an existing file nor registered weights: {e}") from None
    raise AssertionError("unreachable")  # pragma: no cover


def import_object(spec: str, what: str = "object") -> Any:
    """`"package.module:attr.sub"` -> the object."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"{what} {spec!r}: expected 'module:function'")
    try:
        obj = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"{what} {spec!r}: cannot import {module_name}: {e}") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"{what} {spec!r}: {module_name} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


def load_weights_file(path: str | Path, *, pickle_reason: str | None = None) -> Any:
    """Read a checkpoint on CPU: safetensors, or torch.load with weights_only=True unless `pickle_reason`."""
    import torch

    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(path), device="cpu")
    if pickle_reason:
        print(f"mambakit: loading {path} with full unpickling (weights_only=False): {pickle_reason}", file=sys.stderr)
        return torch.load(path, map_location="cpu", weights_only=False)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path}: the file pickles Python objects beyond tensors, so it cannot be read safely "
                         f"(weights_only=True: {first}). If you trust it, pass trust_pickle=True") from None
    except (RuntimeError, EOFError) as e:
        raise ValueError(f"{path}: not a readable torch checkpoint (truncated or corrupt?): {e}") from None


def _tensor_mapping(obj: Any) -> bool:
    import torch
    return isinstance(obj, Mapping) and len(obj) > 0 and all(isinstance(v, torch.Tensor) for v in obj.values())


def _state_dict_of(obj: Any, source: str) -> dict:
    """The state dict inside a loaded file: the file itself, or under a conventional key."""
    if _tensor_mapping(obj):
        state = dict(obj)
    else:
        for key in ("state_dict", "model", "model_state", "module"):
            if isinstance(obj, Mapping) and _tensor_mapping(obj.get(key)):
                state = dict(obj[key])
                break
        else:
            keys = ", ".join(map(str, list(obj)[:10])) if isinstance(obj, Mapping) else type(obj).__name__
            raise ValueError(f"{source}: no state dict found (top level: {keys}); a converter is needed")
    if all(k.startswith("module.") for k in state):  # saved from a DDP-wrapped model
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _build_and_load(builder: str, config: dict, state: Mapping, source: str):
    from torch import nn

    model = import_object(builder, "builder")(**config)
    if not isinstance(model, nn.Module):
        raise TypeError(f"builder {builder!r} returned {type(model).__name__}, not an nn.Module")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{source}: the weights do not fit {builder}(**{config}): {' '.join(str(e).split())}") from None
    return model.eval()


def load_pretrained(name_or_path: str | os.PathLike, *, builder: str | None = None, converter: str | None = None,
                    trust_pickle: bool = False, use_ema: bool = False, **builder_overrides):
    """Build a model and load pretrained weights into it (strictly: every key must match). Returns it in
    eval mode.

    - a registered name: `builder(**config, **builder_overrides)`, weights downloaded and verified, converted
      by the entry's converter;
    - a path written by `save_pretrained`: the builder and config stored in the file (overrides apply);
    - a training checkpoint of `mambakit <app> train` (format "mambakit-checkpoint-v1"), or a run folder
      (`runs/<x>/` or its `checkpoints/`: the checkpoint best.json names, else latest.json's, else the newest):
      the app the checkpoint names rebuilds the network from the saved recipe (`App.rebuild_model`, which reads
      data-dependent sizes such as the number of classes or items from the weights' shapes, so the training
      data need not be present); `use_ema=True` takes the EMA weights. A checkpoint that stores "builder" and
      "builder_config" is built with those instead;
    - a path to a bare state dict (or one under "model" / "state_dict"): give `builder` (and its config as
      keyword arguments), and `converter` when the file is in an upstream layout.

    A file with a `.sha256` sidecar is verified against it before it is read (a mismatch is a CheckpointError,
    a ValueError); a training checkpoint must have its sidecar, as when the engine resumes from it.
    """
    if not isinstance(name_or_path, os.PathLike) and not Path(name_or_path).exists() and is_registered(name_or_path):
        entry = get_weights(name_or_path)
        if use_ema:
            raise ValueError(f"use_ema=True: registered weights {entry.name!r} have no EMA copy (use_ema applies "
                             f"to training checkpoints)")
        path = download_weights(entry.name)
        obj = load_weights_file(path, pickle_reason=entry.pickle_reason)
        state = import_object(entry.converter, "converter")(obj) if entry.converter else _state_dict_of(obj, str(path))
        return _build_and_load(builder or entry.builder, {**entry.config, **builder_overrides}, state,
                               f"weights {entry.name!r} ({path})")
    from mambakit.engine.checkpoint import (CHECKPOINT_FORMAT, missing_sidecar_error, resolve_checkpoint,
                                            verify_checkpoint)

    if Path(name_or_path).is_dir():
        path = resolve_checkpoint(name_or_path, prefer="best")
    else:
        path = resolve_weights(name_or_path)
    # Checked before anything is unpickled. Any file may lack a sidecar, but a training checkpoint without
    # one is refused, as the engine refuses it when resuming: it may be a half-written file.
    verified = verify_checkpoint(path, require_sidecar=False)
    obj = load_weights_file(path, pickle_reason="trust_pickle=True" if trust_pickle else None)
    training = isinstance(obj, Mapping) and obj.get("format") == CHECKPOINT_FORMAT
    if training and verified is None:
        raise missing_sidecar_error(path)
    if use_ema and not training:
        raise ValueError(f"use_ema=True: {path} is not a mambakit training checkpoint, so it holds no EMA weights")
    if isinstance(obj, Mapping) and obj.get("format") == PRETRAINED_FORMAT:
        config = {**obj["config"], **builder_overrides}
        state = import_object(converter, "converter")(obj["state_dict"]) if converter else obj["state_dict"]
        return _build_and_load(builder or obj["builder"], config, state, str(path))
    if builder is None and isinstance(obj, Mapping) and isinstance(obj.get("builder"), str):
        # A training checkpoint that records how its model is built (keys "builder" and "builder_config").
        builder, builder_overrides = obj["builder"], {**(obj.get("builder_config") or {}), **builder_overrides}
    if builder is None and training:
        if converter is not None or builder_overrides:
            given = ["converter"] * (converter is not None) + sorted(builder_overrides)
            raise ValueError(f"{path}: a training checkpoint is rebuilt from its saved recipe; {', '.join(given)} "
                             f"apply only together with builder='module:function'")
        return _rebuild_training_checkpoint(obj, path, use_ema)
    if builder is None:
        kind = "a training checkpoint" if isinstance(obj, Mapping) and "format" in obj else "a bare state dict"
        raise ValueError(f"{path}: {kind} that does not say how to build its model; pass "
                         f"builder='module:function' (and its config as keyword arguments), or write the file with "
                         f"mambakit.zoo.save_pretrained")
    if training:
        state = _checkpoint_weights(obj, path, use_ema)
    else:
        state = import_object(converter, "converter")(obj) if converter else _state_dict_of(obj, str(path))
    return _build_and_load(builder, builder_overrides, state, str(path))


def _checkpoint_weights(obj: Mapping, path: Path, use_ema: bool) -> dict:
    key = "ema" if use_ema else "model"
    state = obj.get(key)
    if state is None and use_ema:
        raise ValueError(f"{path} holds no EMA weights (the run had train.ema_decay unset); load it without "
                         f"use_ema=True")
    if not _tensor_mapping(state):
        raise ValueError(f"{path}: the training checkpoint's {key!r} entry is not a state dict")
    return dict(state)


def _rebuild_training_checkpoint(obj: Mapping, path: Path, use_ema: bool):
    """The model of a training checkpoint, rebuilt by the app its "app" entry names (`App.rebuild_model`)."""
    from torch import nn

    from mambakit.zoo.registry import installed_apps

    name = obj.get("app")
    apps, broken_apps = installed_apps()
    installed = ", ".join(apps) or "none"
    if not isinstance(name, str) or not name:
        raise ValueError(f"{path}: the training checkpoint names no app (its 'app' entry is {name!r}), so it does "
                         f"not say how to build its model; pass builder='module:function'. Installed apps: "
                         f"{installed}")
    if name not in apps:
        broken = broken_apps.get(name)
        why = f"it is installed but failed to load ({broken})" if broken else "it is not installed"
        raise ValueError(f"{path}: a training checkpoint of app {name!r}, and {why}; installed apps: {installed}")
    app = apps[name]
    if app.rebuild_model is None:
        raise ValueError(f"{path}: app {name!r} cannot rebuild its models from a training checkpoint (its App "
                         f"sets no rebuild_model); pass builder='module:function'")
    config = obj.get("config")
    if not isinstance(config, Mapping):
        raise ValueError(f"{path}: the training checkpoint holds no saved recipe ('config'), so app {name!r} "
                         f"cannot rebuild its model")
    state = _checkpoint_weights(obj, path, use_ema)
    source = f"{path} (saved config)"
    model = app.rebuild_model(dict(config), state, source)
    if not isinstance(model, nn.Module):
        raise TypeError(f"app {name!r}: rebuild_model returned {type(model).__name__}, not an nn.Module")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{path}: the {'EMA ' if use_ema else ''}weights do not fit the model app {name!r} "
                         f"rebuilt from the saved recipe: {' '.join(str(e).split())}") from None
    return model.eval()


def save_pretrained(model, path: str | Path, *, builder: str, config: dict, **metadata) -> Path:
    """Write `model`'s weights with the builder and config that rebuild it, atomically.

    `config` and `metadata` must be plain data (dicts, lists, str, numbers, bools, None) so that the file
    reads back with weights_only=True.
    """
    import torch

    import_object(builder, "builder")  # fail now, not when someone loads the file
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": PRETRAINED_FORMAT, "builder": builder, "config": dict(config),
               "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
               "metadata": dict(metadata)}
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return path
