"""The `mambakit` command.

    mambakit --help                       apps (discovered, see mambakit.apps) and built-in commands
    mambakit <app> --help                 the app's verbs
    mambakit <app> <verb> [args]          runs a verb (argparse subparsers built from the App's Verbs)
    mambakit <app> recipes [NAME]         the app's packaged recipes (every app has this verb); `-c NAME` takes one
    mambakit data list | fetch NAME [--from PATH] | info NAME
    mambakit zoo list | download NAME [--from FILE] | info NAME
    mambakit quickstart [APP ...]         each app's quick recipe, then one results table (runs and table in
                                          --out-dir/quickstart-<time>/)

Exit codes: 0 ok, 2 usage error (unknown app / verb / name, bad arguments), 1 failure. A ConfigError or
DataError (both ValueErrors), a DownloadError or an OSError (PIL's unreadable images among them) raised by a
command, also from inside a data-loading worker, prints its one-line message without a traceback, unless
MAMBAKIT_DEBUG=1. The command first asks torch for huge pages (THP_MEM_ALLOC_ENABLE=1 unless set) and tunes
glibc's malloc for reused buffers (`mambakit.runtime`; MAMBAKIT_MALLOC=default leaves malloc alone,
MAMBAKIT_MALLOC=heap also keeps blocks above 32 MiB for reuse), and shortens how long torch's idle OpenMP threads
spin (GOMP_SPINCOUNT=10000 unless OMP_WAIT_POLICY or GOMP_SPINCOUNT is set): training
slows far less next to other jobs (benchmarks/README.md, "Training under a competing load").
`python -m mambakit` and `torchrun -m mambakit` run the same thing.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import traceback
from datetime import datetime
from difflib import get_close_matches
from pathlib import Path
from typing import Sequence

import mambakit
from mambakit import apps as app_registry
from mambakit.data.download import DownloadError
from mambakit.data.registry import UnknownEntryError
from mambakit.runtime import configure_malloc, configure_openmp, configure_threads, prefer_huge_pages

__all__ = ["main"]

BUILTIN_HELP = {
    "data": "list the registered datasets and fetch them into the cache",
    "zoo": "list the registered pretrained weights and download them",
    "quickstart": "train every app's quick recipe (or the apps named) and print one results table",
}
#: The verb the CLI gives every app (an app's own verb of that name wins).
RECIPES_HELP = {
    "recipes": "list the recipes that ship with mambakit for this app (`-c NAME` takes any of them); "
               "`recipes NAME` prints one to copy and edit",
}


class UsageError(Exception):
    """Bad command line: printed with the usage hint, exit code 2."""


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = os.environ.get("MAMBAKIT_DEBUG", "").strip().lower() in ("1", "true", "yes", "on")
    try:
        prefer_huge_pages()      # before torch's first allocation; huge pages and heap reuse for a training
        configure_malloc()       # loop's buffers (measured in mambakit/runtime.py; both can be opted out of)
        configure_openmp()       # before torch loads libgomp: idle threads spin ~0.1 ms, not ~4 ms (shared machines)
        configure_threads(log=lambda line: print(line, file=sys.stderr))   # one thread where others hold the cores
        return _dispatch(argv)
    except SystemExit as e:  # argparse: --help (0) and usage errors (2); verbs calling sys.exit
        if e.code is None or isinstance(e.code, int):
            return e.code or 0
        print(e.code, file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("mambakit: interrupted", file=sys.stderr)
        return 130
    except (UsageError, UnknownEntryError) as e:
        if debug:
            raise
        print(f"mambakit: error: {e}", file=sys.stderr)
        return 2
    except (ValueError, DownloadError, OSError) as e:
        # ConfigError and DataError are ValueErrors; what PIL and file access raise (UnidentifiedImageError,
        # truncated files, missing or unreadable files) are OSErrors: bad input, told in one message.
        if debug:
            raise
        print(f"mambakit: error: {_error_message(e)}", file=sys.stderr)
        return 1


def _error_message(e: BaseException) -> str:
    """The message of `e`. An error raised in a DataLoader worker reaches the main process with the worker's
    traceback in its message ("Caught DataError in DataLoader worker process 0. Original Traceback ..."):
    its message is what follows the traceback's last frame."""
    import re

    text = str(e).strip()
    if "in DataLoader worker process" in text and "Original Traceback" in text:
        lines = text.splitlines()
        frames = [i for i, line in enumerate(lines) if re.match(r'  File ".*", line \d+', line)]
        if frames:
            rest = lines[frames[-1] + 1:]
            while rest and rest[0].startswith("    "):      # the frame's source line and its ^^^ markers
                rest = rest[1:]
            if rest:
                kind, sep, first = rest[0].partition(": ")
                text = "\n".join([first if sep and " " not in kind else rest[0], *rest[1:]]).strip()
    return text or type(e).__name__


def _dispatch(argv: list[str]) -> int:
    if not argv:
        print(_top_level_help(), file=sys.stderr)
        return 2
    head, rest = argv[0], argv[1:]
    if head in ("-h", "--help", "help"):
        print(_top_level_help())
        return 0
    if head == "--version":
        print(f"mambakit {mambakit.__version__}")
        return 0
    if head.startswith("-"):
        raise UsageError(f"unknown option {head!r}; options go after the command (see `mambakit --help`)")
    if head in BUILTIN_HELP:
        return _run_builtin(head, rest)
    apps = app_registry.discover()
    if head in apps:
        return _run_app(apps[head], rest)
    broken = app_registry.broken_apps()
    if head in broken:
        raise UsageError(f"app {head!r} failed to load: {broken[head]}")
    close = get_close_matches(head, list(apps) + list(BUILTIN_HELP), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise UsageError(f"unknown command {head!r}{hint}; apps: {', '.join(apps) or 'none registered'}; "
                     f"commands: {', '.join(BUILTIN_HELP)}")


# --------------------------------------------------------------------------------------------------
# help

def _columns(rows: list[tuple[str, str]], width: int, indent: int = 2) -> str:
    return "\n".join(f"{' ' * indent}{name:<{width}}{text}" for name, text in rows)


def _top_level_help() -> str:
    apps = app_registry.discover()
    app_rows = [(name, app.description) for name, app in apps.items()]
    app_rows += [(name, f"(failed to load: {why})") for name, why in app_registry.broken_apps().items()]
    width = max(len(name) for name in [*BUILTIN_HELP, *(n for n, _ in app_rows)]) + 3
    lines = [
        "usage: mambakit [-h] [--version] <app|command> ...",
        "",
        mambakit.__doc__.strip(),
        "",
        "apps:",
        _columns(app_rows, width) if app_rows else "  (none registered)",
        "",
        "commands:",
        _columns(list(BUILTIN_HELP.items()), width),
        "",
        "`mambakit <app> --help` lists an app's verbs; `mambakit <app> recipes` lists the recipes it ships, which",
        "`-c NAME` takes from any folder; `mambakit <command> --help` explains a command.",
        "environment: MAMBAKIT_HOME (cache folder, default ~/.cache/mambakit), MAMBAKIT_OFFLINE=1 (use the cache "
        "only),",
        "             MAMBAKIT_DEBUG=1 (show tracebacks).",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# apps

def _recipes_verb(app):
    from mambakit.engine.app import Verb

    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("name", nargs="?", metavar="RECIPE",
                            help="print this recipe's YAML (`... recipes NAME > my.yaml`, edit, then -c my.yaml)")

    def run(args: argparse.Namespace) -> int:
        from mambakit.engine.recipes import list_recipes, recipe_dirs, resolve_recipe

        if args.name:
            from mambakit.engine.config import ConfigError
            try:
                path = resolve_recipe(args.name, app.name)
            except ConfigError as e:     # an unknown name is a usage error, like an unknown verb
                raise UsageError(str(e)) from None
            sys.stdout.write(path.read_text())
            return 0
        recipes = list_recipes(app.name)
        if not recipes:
            print(f"app {app.name!r} ships no recipes")
            return 0
        print(_text_table(["NAME", "DESCRIPTION"], [[r.name, r.description] for r in recipes]))
        print(f"\nfrom: {', '.join(map(str, recipe_dirs(app.name)))}")
        print(f"use:  mambakit {app.name} train -c NAME [key.sub=value ...]   (a path to a YAML file works too)")
        return 0

    return Verb("recipes", RECIPES_HELP["recipes"], add_arguments, run)


def _verbs(app) -> list:
    """The app's verbs, then the ones the CLI gives every app that it does not define itself."""
    own = {v.name for v in app.verbs}
    return [*app.verbs, *(v for v in (_recipes_verb(app),) if v.name not in own)]


def _app_parser(app) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"mambakit {app.name}", description=app.description)
    verbs = parser.add_subparsers(dest="_verb", metavar="<verb>", title="verbs")
    verbs.required = True
    for verb in _verbs(app):
        sub = verbs.add_parser(verb.name, help=verb.help, description=verb.help)
        verb.add_arguments(sub)
        sub.set_defaults(_run=verb.run)
    return parser


def _run_app(app, rest: list[str]) -> int:
    parser = _app_parser(app)
    if not rest:
        parser.print_help(sys.stderr)
        return 2
    names = [v.name for v in _verbs(app)]
    if not rest[0].startswith("-") and rest[0] not in names:
        close = get_close_matches(rest[0], names, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise UsageError(f"app {app.name!r} has no verb {rest[0]!r}{hint}; verbs: {', '.join(names) or 'none'}")
    args = parser.parse_args(rest)
    code = args._run(args)
    return 0 if code is None else int(code)


# --------------------------------------------------------------------------------------------------
# built-in commands

def _builtin_parser(name: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"mambakit {name}", description=BUILTIN_HELP[name])
    if name == "quickstart":
        parser.add_argument("apps", nargs="*", metavar="APP", help="apps to run (default: every app with a quick recipe)")
        parser.add_argument("--out-dir", default="runs", help="the table and each app's runs (in <app>/) go to "
                                                             "OUT_DIR/quickstart-<timestamp>/ (default: runs)")
        parser.set_defaults(_run=_quickstart)
        return parser
    sub = parser.add_subparsers(dest="_action", metavar="<action>", title="actions")
    sub.required = True
    kind = "dataset" if name == "data" else "weights"
    p = sub.add_parser("list", help=f"the registered {kind} and whether they are cached")
    p.set_defaults(_run=_data_list if name == "data" else _zoo_list)
    p = sub.add_parser("info", help=f"everything known about one {kind} entry")
    p.add_argument("name")
    p.set_defaults(_run=_data_info if name == "data" else _zoo_info)
    if name == "data":
        p = sub.add_parser("fetch", help="fetch a dataset into the cache and print its folder")
        p.add_argument("name")
        p.add_argument("--from", dest="local_path", metavar="PATH",
                       help="take the files from this file or folder (or wheel) instead of the sources")
        p.add_argument("--verify", action="store_true",
                       help="hash the cached files again; refetch any that no longer match their sha256")
        p.set_defaults(_run=_data_fetch)
    else:
        p = sub.add_parser("download", help="download weights into the cache (checksum verified) and print the path")
        p.add_argument("name")
        p.add_argument("--from", dest="local_path", metavar="FILE",
                       help="take the weights from this file (downloaded elsewhere) instead of the network: its "
                            "sha256 is checked against the pinned one, then it is copied into the cache")
        p.set_defaults(_run=_zoo_download)
    return parser


def _run_builtin(name: str, rest: list[str]) -> int:
    parser = _builtin_parser(name)
    if name != "quickstart" and rest and not rest[0].startswith("-"):
        actions = ["list", "info", "fetch" if name == "data" else "download"]
        if rest[0] not in actions:
            close = get_close_matches(rest[0], actions, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise UsageError(f"`mambakit {name}` has no action {rest[0]!r}{hint}; actions: {', '.join(actions)}")
    args = parser.parse_args(rest)
    code = args._run(args)
    return 0 if code is None else int(code)


def _text_table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in column) for column in zip(headers, *rows)]
    lines = ["  ".join(f"{h:<{w}}" for h, w in zip(headers, widths)).rstrip()]
    lines += ["  ".join(f"{str(c):<{w}}" for c, w in zip(row, widths)).rstrip() for row in rows]
    return "\n".join(lines)


def _cached_state(present: int, total: int) -> str:
    return "yes" if present == total else "no" if present == 0 else f"{present}/{total}"


def _data_list(args) -> int:
    from mambakit.data import cached_files, list_datasets, mambakit_home

    entries = list_datasets()
    if not entries:
        print("no datasets registered")
        return 0
    rows = [[e.name, e.app, str(len(e.files)), _cached_state(len(cached_files(e)), len(e.files)), e.description]
            for e in entries]
    print(_text_table(["NAME", "APP", "FILES", "CACHED", "DESCRIPTION"], rows))
    print(f"\ncache: {mambakit_home() / 'datasets'}")
    return 0


def _data_info(args) -> int:
    from mambakit.data import dataset_dir, get_dataset

    entry = get_dataset(args.name)
    folder = dataset_dir(entry.name)
    print(f"{entry.name} ({entry.app}): {entry.description}")
    for label, value in (("homepage", entry.homepage), ("licence", entry.licence), ("citation", entry.citation)):
        if value:
            print(f"  {label}: {value}")
    print(f"  folder: {folder}")
    for f in entry.files:
        state = "cached" if (folder / f.name).is_file() else "missing"
        size = f", {f.size} bytes" if f.size is not None else ""
        transform = f", transform {f.transform}" if f.transform else ""
        print(f"  - {f.name} [{state}] sha256 {f.sha256 or 'UNPINNED'}{size}{transform}")
        for source in f.sources:
            print(f"      from {source.describe()}")
    return 0


def _data_fetch(args) -> int:
    from mambakit.data import fetch

    print(fetch(args.name, local_path=args.local_path, verify=args.verify))
    return 0


def _zoo_list(args) -> int:
    from mambakit.zoo import list_weights, weights_path

    entries = list_weights()
    if not entries:
        print("no pretrained weights registered")
        return 0
    rows = [[e.name, e.app, e.licence or "?", ", ".join(f"{k}={v}" for k, v in e.metrics.items()),
             "yes" if weights_path(e).is_file() else "no", e.description] for e in entries]
    print(_text_table(["NAME", "APP", "LICENCE", "METRICS", "CACHED", "DESCRIPTION"], rows))
    return 0


def _zoo_info(args) -> int:
    from mambakit.zoo import get_weights, weights_path

    e = get_weights(args.name)
    print(f"{e.name} ({e.app}): {e.description}")
    for label, value in (("builder", f"{e.builder}(**{e.config})"), ("converter", e.converter),
                         ("licence", e.licence), ("source", e.source), ("sha256", e.sha256 or "UNPINNED"),
                         ("file", f"{weights_path(e)} [{'cached' if weights_path(e).is_file() else 'missing'}]")):
        if value:
            print(f"  {label}: {value}")
    for url in e.urls:
        print(f"  url: {url}")
    for k, v in e.metrics.items():
        print(f"  metric {k}: {v}")
    return 0


def _zoo_download(args) -> int:
    from mambakit.zoo import download_weights

    print(download_weights(args.name, local_path=args.local_path))
    return 0


# --------------------------------------------------------------------------------------------------
# quickstart

_COLUMNS = [("app", "app"), ("model", "model"), ("data", "data"), ("metric", "metric"), ("value", "value"),
            ("baseline", "baseline"), ("baseline value", "baseline_value"), ("wall time", "wall_time_s")]


def _fmt(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    return str(value)


def _markdown_table(rows: list[dict]) -> str:
    columns = list(_COLUMNS) + ([("error", "error")] if any(r.get("error") for r in rows) else [])
    cells = [[(f"{r[key]:.1f} s" if key == "wall_time_s" and r.get(key) is not None else _fmt(r.get(key)))
              .replace("|", "\\|") for _, key in columns] for r in rows]
    widths = [max(len(c) for c in col) for col in zip([h for h, _ in columns], *cells)]
    line = lambda items: "| " + " | ".join(f"{x:<{w}}" for x, w in zip(items, widths)) + " |"  # noqa: E731
    return "\n".join([line([h for h, _ in columns]), line(["-" * w for w in widths]), *map(line, cells)])


def _new_run_dir(out_dir: str) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path(out_dir) / f"quickstart-{stamp}"
    path, n = base, 1
    while path.exists():
        path, n = base.with_name(f"{base.name}-{n}"), n + 1
    path.mkdir(parents=True)
    return path


def _run_one_quickstart(app, run_dir: Path) -> dict:
    from mambakit.engine.app import QuickstartResult, run_quickstart

    row = {"app": app.name}
    print(f"mambakit quickstart: {app.name} ...", file=sys.stderr)
    start = time.perf_counter()
    try:
        result = run_quickstart(app.quickstart, run_dir / app.name)
        if not isinstance(result, QuickstartResult):
            raise TypeError(f"quickstart() returned {type(result).__name__}, expected QuickstartResult")
        row.update(model=result.model, data=result.data, metric=result.metric, value=float(result.value),
                   baseline=result.baseline, baseline_value=float(result.baseline_value),
                   train_time_s=float(result.wall_time_s), run_dir=result.run_dir, error=None)
    except Exception as e:  # one failing app is reported; the others still run
        text = traceback.format_exc()
        (run_dir / f"{app.name}-error.txt").write_text(text)
        message = str(e).strip().splitlines()[0] if str(e).strip() else ""
        row["error"] = f"{type(e).__name__}: {message}" if message else type(e).__name__
        print(f"mambakit quickstart: {app.name} failed: {row['error']} (traceback in "
              f"{run_dir / (app.name + '-error.txt')})", file=sys.stderr)
        if os.environ.get("MAMBAKIT_DEBUG"):
            print(text, file=sys.stderr)
    row["wall_time_s"] = time.perf_counter() - start
    return row


def _quickstart(args) -> int:
    apps = app_registry.discover()
    if args.apps:
        selected = [app_registry.get_app(name) for name in dict.fromkeys(args.apps)]
        lacking = [a.name for a in selected if a.quickstart is None]
        if lacking:
            raise UsageError(f"no quick recipe in: {', '.join(lacking)}; apps with one: "
                             f"{', '.join(n for n, a in apps.items() if a.quickstart) or 'none'}")
    else:
        selected = [a for a in apps.values() if a.quickstart is not None]
        skipped = [n for n, a in apps.items() if a.quickstart is None]
        if skipped:
            print(f"mambakit quickstart: no quick recipe in {', '.join(skipped)}; skipped", file=sys.stderr)
    if not selected:
        print("mambakit quickstart: no registered app has a quick recipe "
              f"(apps: {', '.join(apps) or 'none registered'})", file=sys.stderr)
        return 1
    started = time.perf_counter()
    run_dir = _new_run_dir(args.out_dir)
    rows = [_run_one_quickstart(app, run_dir) for app in selected]
    total = f"total wall time: {time.perf_counter() - started:.1f} s for {len(rows)} app(s)"
    table = _markdown_table(rows)
    (run_dir / "results.md").write_text(table + "\n")
    (run_dir / "results.json").write_text(json.dumps(
        [{k: (_fmt(v) if isinstance(v, float) and not math.isfinite(v) else v) for k, v in r.items()} for r in rows],
        indent=2) + "\n")
    print(table)                  # stdout is the table alone (`mambakit quickstart > table.md`)
    failed = [r["app"] for r in rows if r.get("error")]
    print(f"\n{total}\nresults: {run_dir / 'results.md'} and results.json; runs: {run_dir}/<app>/"
          + (f"; failed: {', '.join(failed)}" if failed else ""), file=sys.stderr)
    return 1 if failed else 0
