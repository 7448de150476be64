"""The recipes that ship with mambakit, and how `-c NAME` finds one.

Recipes are package data: `mambakit/configs/<app>/<name>.yaml` (the repository's `configs/` is a link to
it), so a wheel install has them as well as a clone. `-c` takes a path or a recipe name:

    -c my.yaml                                  a file that exists always wins
    -c smamba_custom   -c smamba_custom.yaml    the app's packaged recipe of that name
    -c timeseries/smamba_custom                 the packaged recipe of that app
    -c configs/timeseries/smamba_custom.yaml    the repository path of the README, from any folder

An unknown name is an error that lists the closest recipe names. A recipe's description (shown by
`mambakit <app> recipes`) is the first sentence of the comment at the top of its YAML file.

Apps whose recipes live elsewhere (a third-party package) add their folder with `add_recipe_dir(app, path)`;
discovery (`mambakit.apps`) does it for an `App(recipe_dir=...)`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from difflib import get_close_matches
from pathlib import Path, PurePosixPath

from .config import ConfigError

__all__ = ["RECIPES_DIR", "Recipe", "add_recipe_dir", "recipe_dirs", "list_recipes", "resolve_recipe",
           "recipe_description"]

#: The packaged recipes: one folder per app.
RECIPES_DIR = Path(__file__).resolve().parents[1] / "configs"

_EXTRA_DIRS: dict[str, list[Path]] = {}
# Prefixes a user may copy from the docs: `configs/<app>/x.yaml`, `mambakit/configs/<app>/x.yaml`.
_DOC_PREFIXES = (("mambakit", "configs"), ("configs",))
_DESCRIPTION_WIDTH = 100


@dataclass(frozen=True)
class Recipe:
    app: str
    name: str            # the file's stem, what `-c` takes
    path: Path

    @property
    def description(self) -> str:
        return recipe_description(self.path)


def add_recipe_dir(app: str, folder: str | Path) -> None:
    """Make the recipes in `folder` (its *.yaml files) names of `app`, after its packaged ones."""
    folder = Path(folder)
    dirs = _EXTRA_DIRS.setdefault(app, [])
    if folder not in dirs:
        dirs.append(folder)


def recipe_dirs(app: str) -> list[Path]:
    """Where `app`'s recipes are, packaged first; only folders that exist."""
    return [d for d in [RECIPES_DIR / app, *_EXTRA_DIRS.get(app, ())] if d.is_dir()]


def _apps() -> list[str]:
    packaged = [d.name for d in RECIPES_DIR.iterdir() if d.is_dir()] if RECIPES_DIR.is_dir() else []
    return sorted(set(packaged) | set(_EXTRA_DIRS))


def list_recipes(app: str | None = None) -> list[Recipe]:
    """The recipes of `app` (every app when None), by app and name. A name in an earlier folder hides the
    same name in a later one."""
    recipes = []
    for name in ([app] if app is not None else _apps()):
        seen: dict[str, Recipe] = {}
        for folder in recipe_dirs(name):
            for path in sorted(folder.glob("*.yaml")):
                seen.setdefault(path.stem, Recipe(name, path.stem, path))
        recipes += sorted(seen.values(), key=lambda r: r.name)
    return recipes


def _strip_doc_prefix(parts: tuple[str, ...]) -> tuple[str, ...]:
    for prefix in _DOC_PREFIXES:
        if parts[:len(prefix)] == prefix and len(parts) > len(prefix):
            return parts[len(prefix):]
    return parts


def resolve_recipe(spec: str | Path, app: str | None = None) -> Path:
    """The YAML file `spec` means: a path that exists, else a packaged recipe name (see the module doc).

    app: the app whose recipes a bare name means; None searches every app (a name two apps have is then
    an error asking for `app/name`). Raises ConfigError naming the spec and the closest recipes.
    """
    path = Path(spec).expanduser()
    if path.is_file():
        return path
    parts = _strip_doc_prefix(PurePosixPath(str(spec).strip().replace("\\", "/")).parts)
    if path.is_absolute() or not parts or len(parts) > 2 or (len(parts) == 2 and parts[0] not in _apps()):
        raise ConfigError(f"{spec}: config file not found")
    stem = parts[-1]
    for suffix in (".yaml", ".yml"):
        stem = stem[:-len(suffix)] if stem.endswith(suffix) else stem
    wanted = parts[0] if len(parts) == 2 else app
    if app is not None and wanted != app:
        raise ConfigError(f"{spec}: a recipe of app {wanted!r}, not of {app!r}; `mambakit {app} recipes` lists "
                          f"{app}'s recipes")
    candidates = list_recipes(wanted)
    found = [r for r in candidates if r.name == stem]
    if len(found) == 1:
        return found[0].path
    if len(found) > 1:
        raise ConfigError(f"{spec}: recipe {stem!r} exists in several apps ("
                          f"{', '.join(f'{r.app}/{r.name}' for r in found)}); give one of these")
    raise ConfigError(_not_found(spec, stem, wanted, candidates))


def _not_found(spec, stem: str, app: str | None, candidates: list[Recipe]) -> str:
    close = get_close_matches(stem, [r.name for r in candidates], n=3, cutoff=0.5)
    labels = [r.name if app else f"{r.app}/{r.name}" for r in candidates if r.name in close]
    message = f"{spec}: config file not found, and no recipe of {f'app {app!r}' if app else 'any app'} " \
              f"is named {stem!r}"
    if labels:
        message += f" (did you mean {', '.join(labels)}?)"
    if app and candidates:
        message += f"; `mambakit {app} recipes` lists them"
    elif app:
        message += f"; app {app!r} ships no recipes"
    return message


def recipe_description(path: str | Path) -> str:
    """The first sentence of the comment block at the top of a YAML file ('' when it has none), on one line
    of at most 100 characters."""
    lines = []
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return ""
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped.startswith("#"):
            break
        body = stripped.lstrip("#").strip()
        # A blank comment line or an indented command line ends the opening paragraph.
        if not body or line.lstrip().lstrip("#").startswith("   "):
            if lines:
                break
            continue
        lines.append(body)
        if body.endswith((".", ":")):
            break
    paragraph = " ".join(lines)
    # A sentence ends at a full stop before a capital ("et al. 2024", "e.g. a" go on).
    sentence = re.split(r"(?<=\.)\s+(?=[A-Z])", paragraph, maxsplit=1)[0].rstrip(":. ")
    if len(sentence) > _DESCRIPTION_WIDTH:
        sentence = sentence[:_DESCRIPTION_WIDTH - 3].rsplit(" ", 1)[0].rstrip(",;:(") + "..."
    return sentence
