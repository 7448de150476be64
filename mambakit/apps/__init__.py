"""App discovery: which apps exist, found through a registry rather than an if-chain.

Two ways in:
- the entry-point group `mambakit.apps` (pyproject.toml), which is how mambakit's own apps and third-party
  packages register: `timeseries = "mambakit.apps.timeseries.app:APP"` (an `App`, or a function returning one);
- `register_app(app)` in the running process (tests, notebooks, plugins loaded by hand). An app registered
  this way shadows an entry point of the same name.

Discovery is lazy: nothing is imported until someone asks (`mambakit --help`, `data list`, ...). An app whose
module fails to import does not break the others: it is reported by `broken_apps()` and shown as such.

This is the layer that knows the apps, so it feeds the registries below it (`install()`, run on import and
named in the `mambakit.plugins` entry-point group for processes that import only mambakit.data / .zoo): the
dataset and weight registries get providers, which they ask on a lookup that misses or a full listing (and
so discover the apps only then), and the zoo learns which apps can rebuild training checkpoints. Discovery
adds each app's `recipe_dir` to the recipe names `-c` resolves. The data and zoo layers never import the
apps (kernels <- core <- {engine, data, zoo} <- apps <- cli).
"""

from __future__ import annotations

from difflib import get_close_matches
from importlib.metadata import entry_points

from mambakit.data.registry import UnknownEntryError, add_dataset_provider
from mambakit.engine.app import App
from mambakit.engine.recipes import add_recipe_dir
from mambakit.zoo.registry import add_weights_provider, set_app_catalogue

__all__ = ["ENTRY_POINT_GROUP", "BUILTIN_COMMANDS", "register_app", "unregister_app", "discover", "iter_apps",
           "get_app", "broken_apps", "install"]

ENTRY_POINT_GROUP = "mambakit.apps"
#: Names the CLI keeps for itself; no app may take them.
BUILTIN_COMMANDS = ("data", "zoo", "quickstart")

_IN_PROCESS: dict[str, App] = {}
_FROM_ENTRY_POINTS: dict[str, App] | None = None     # loaded once per process
_BROKEN: dict[str, str] = {}


def _check(app: object, where: str) -> App:
    if not isinstance(app, App):
        raise TypeError(f"{where}: expected a mambakit.engine.app.App, got {type(app).__name__}")
    if app.name in BUILTIN_COMMANDS:
        raise ValueError(f"{where}: the app name {app.name!r} is reserved for a built-in command")
    verbs = [v.name for v in app.verbs]
    if len(set(verbs)) != len(verbs):
        raise ValueError(f"{where}: app {app.name!r} has duplicate verbs in {verbs}")
    return app


def register_app(app: App, *, replace: bool = False) -> App:
    """Make `app` visible to the CLI and to the dataset / weight registries in this process."""
    _check(app, "register_app")
    old = _IN_PROCESS.get(app.name)
    if old is not None and old is not app and not replace:
        raise ValueError(f"an app named {app.name!r} is already registered; pass replace=True to override it")
    _IN_PROCESS[app.name] = app
    return app


def unregister_app(name: str) -> None:
    _IN_PROCESS.pop(name, None)


def _load_entry_points() -> dict[str, App]:
    global _FROM_ENTRY_POINTS
    if _FROM_ENTRY_POINTS is None:
        loaded = {}
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            where = f"entry point {ep.name} = {ep.value}"
            try:
                obj = ep.load()
                app = _check(obj() if callable(obj) and not isinstance(obj, App) else obj, where)
                if app.name != ep.name:
                    raise ValueError(f"{where}: the App is named {app.name!r}, the entry point {ep.name!r}")
            except Exception as e:  # one broken app must not take the CLI down
                _BROKEN[ep.name] = f"{type(e).__name__}: {e}"
                continue
            loaded[ep.name] = app
        _FROM_ENTRY_POINTS = loaded
    return _FROM_ENTRY_POINTS


def discover(refresh: bool = False) -> dict[str, App]:
    """Every app that loaded, by name (entry points first, then in-process registrations), sorted by name."""
    global _FROM_ENTRY_POINTS
    if refresh:
        _FROM_ENTRY_POINTS = None
        _BROKEN.clear()
    apps = {**_load_entry_points(), **_IN_PROCESS}
    for app in apps.values():
        if app.recipe_dir is not None:
            add_recipe_dir(app.name, app.recipe_dir)
    return dict(sorted(apps.items()))


def iter_apps() -> list[App]:
    return list(discover().values())


def broken_apps() -> dict[str, str]:
    """Entry points that failed to load: name -> one-line reason."""
    _load_entry_points()
    return {name: why for name, why in _BROKEN.items() if name not in _IN_PROCESS}


def get_app(name: str) -> App:
    apps = discover()
    if name in apps:
        return apps[name]
    if name in broken_apps():
        raise UnknownEntryError(f"app {name!r} failed to load: {broken_apps()[name]}")
    close = get_close_matches(name, list(apps) + list(BUILTIN_COMMANDS), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise UnknownEntryError(f"unknown app {name!r}{hint}; apps: {', '.join(apps) or 'none registered'}")


def _datasets_of_apps():
    for app in iter_apps():
        yield from getattr(app, "datasets", ()) or ()


def _weights_of_apps():
    for app in iter_apps():
        yield from getattr(app, "weights", ()) or ()


def _catalogue() -> tuple[dict[str, App], dict[str, str]]:
    return discover(), broken_apps()


def install() -> None:
    """Feed the registries below this layer: the apps' datasets and weights, and the installed apps (whose
    rebuild_model turns training checkpoints into models). Named in pyproject's `mambakit.plugins` group, so
    a process that never imports this module still gets them; running it again changes nothing."""
    add_dataset_provider(_datasets_of_apps)
    add_weights_provider(_weights_of_apps)
    set_app_catalogue(_catalogue)


install()
