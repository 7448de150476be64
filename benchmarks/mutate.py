"""Mutation check: plant one small bug at a time in a temporary copy of the repository, run the tests that
should catch it, and report which bugs survived (their tests still passed).

    python benchmarks/mutate.py                       # every mutation below
    python benchmarks/mutate.py --only engine-        # those whose name starts with engine-
    python benchmarks/mutate.py --list                # names, files and what each plants
    python benchmarks/mutate.py --json out.json --markdown out.md

Each mutation replaces one exact piece of text in one file. When that text is not found exactly once (the code
was rewritten since the mutation was written), the mutation is reported as ERROR "pattern not found" (or
"found N times") -- never skipped silently: update its `old` text. Before the mutants, the selected tests run
once on the unmutated copy (per distinct test list); a failure there is an ERROR too, since a mutant "killed"
by an already failing test proves nothing (`--no-baseline` skips that check).

The copy holds the files git tracks or would track (`git ls-files --cached --others --exclude-standard`);
a `shared` folder beside the repository (test data, found as ../shared/data) is linked beside the copy. Tests
run as `python -m pytest -x -q -m 'not slow' TESTS` in the copy, with PYTHONPATH set to it.

Exit status: 0 every mutant killed, 1 some survived, 2 some errors.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutation:
    name: str
    file: str                  # relative to the repository root
    old: str                   # must occur exactly once in the file
    new: str
    tests: tuple[str, ...]     # pytest node ids or paths, relative to the repository root
    why: str = ""              # the bug it stands for


ENGINE_TESTS = ("tests/engine/test_engine_absolute.py", "tests/engine/test_engine_runs.py",
                "tests/engine/test_engine_optim.py", "tests/engine/test_engine_trainer.py")

MUTATIONS: tuple[Mutation, ...] = (
    # -- the five survivors named in issue 27 ------------------------------------------------------------
    Mutation("timeseries-mae-squared", "mambakit/apps/timeseries/metrics.py",
             'prefix + "ae": diff.abs().reshape(b, -1).sum(1),',
             'prefix + "ae": diff.square().reshape(b, -1).sum(1),',
             ("tests/apps/timeseries",), "forecasting MAE computed as squared error"),
    Mutation("pathology-cindex-event-inverted", "mambakit/apps/pathology/task.py",
             'event = (1 - outputs["censorship"].cpu().numpy()).astype(bool)',
             'event = outputs["censorship"].cpu().numpy().astype(bool)',
             ("tests/apps/pathology",), "C-index with the event indicator taken from the censorship column"),
    Mutation("recsys-full-ranking-always-masks-history", "mambakit/apps/recsys/task.py",
             "        if self.config.eval.mask_history:",
             "        if True:",
             ("tests/apps/recsys",), "full ranking masks the user's history although the protocol does not"),
    Mutation("timeseries-ms-scores-first-column", "mambakit/apps/timeseries/task.py",
             "pred, true = pred[..., -1:], true[..., -1:]",
             "pred, true = pred[..., :1], true[..., -1:]",
             ("tests/apps/timeseries",), "features MS scoring the prediction's first column, not the target"),
    Mutation("engine-clip-infinite-threshold", "mambakit/engine/trainer.py",
             "norm = torch.nn.utils.clip_grad_norm_(params, clip)",
             'norm = torch.nn.utils.clip_grad_norm_(params, float("inf"))',
             ENGINE_TESTS, "gradient clipping at an infinite threshold: norm logged, nothing clipped"),
    Mutation("vision-predict-train-transform", "mambakit/apps/vision/task.py",
             "        _, evaluate = build_transforms(data, self.config.augment,",
             "        evaluate, _ = build_transforms(data, self.config.augment,",
             ("tests/apps/vision",), "predict uses the augmenting training transform"),
    # -- engine options ----------------------------------------------------------------------------------
    Mutation("engine-accum-loss-not-divided", "mambakit/engine/trainer.py",
             "scale = env.world_size * local_n / global_n / window_len",
             "scale = env.world_size * local_n / global_n",
             ENGINE_TESTS, "accumulated micro-batch losses summed instead of averaged"),
    Mutation("engine-accum-steps-every-micro-batch", "mambakit/engine/trainer.py",
             "last_micro = (index + 1) % cfg.grad_accum == 0 or index == self.batches_per_epoch - 1",
             "last_micro = True",
             ENGINE_TESTS, "an optimiser step after every micro-batch"),
    Mutation("engine-ema-decay-swapped", "mambakit/engine/ema.py",
             "torch._foreach_lerp_(lerp_ema, lerp_model, 1.0 - self.decay)",
             "torch._foreach_lerp_(lerp_ema, lerp_model, self.decay)",
             ENGINE_TESTS, "EMA weighting the new weights by decay instead of 1 - decay"),
    Mutation("engine-schedule-min-lr-ignored", "mambakit/engine/optim.py",
             "return config.min_lr + 0.5 * (peak_lr - config.min_lr) * (1.0 + math.cos(math.pi * progress))",
             "return 0.5 * peak_lr * (1.0 + math.cos(math.pi * progress))",
             ENGINE_TESTS, "cosine schedule decaying to 0 instead of min_lr"),
    Mutation("engine-schedule-warmup-prefix-ignored", "mambakit/engine/optim.py",
             "    if config.warmup_prefix:",
             "    if False:",
             ENGINE_TESTS, "warmup_prefix ignored"),
    Mutation("engine-schedule-one-step-late", "mambakit/engine/optim.py",
             "        return lr_at(self.config, self.peak_lr, self.step_count, self.steps_per_epoch, self.total_steps)",
             "        return lr_at(self.config, self.peak_lr, max(self.step_count - 1, 0), self.steps_per_epoch, "
             "self.total_steps)",
             ENGINE_TESTS, "each update uses the previous step's learning rate"),
    Mutation("engine-schedule-epoch-interval-ignored", "mambakit/engine/optim.py",
             '    if config.interval == "epoch":',
             "    if False:",
             ENGINE_TESTS, "interval=epoch schedules moving every step"),
    Mutation("engine-weight-decay-on-everything", "mambakit/engine/optim.py",
             "(no_decay if skip else decay).append((name, param))",
             "decay.append((name, param))",
             ENGINE_TESTS, "biases, norms and flagged parameters decayed"),
    Mutation("engine-adam-is-adamw", "mambakit/engine/optim.py",
             "        return torch.optim.Adam(groups, lr=config.lr,",
             "        return torch.optim.AdamW(groups, lr=config.lr,",
             ENGINE_TESTS, "Adam's L2 weight decay replaced by decoupled decay"),
    Mutation("engine-nesterov-ignored", "mambakit/engine/optim.py",
             "momentum=config.momentum, nesterov=config.nesterov,",
             "momentum=config.momentum, nesterov=False,",
             ENGINE_TESTS, "SGD nesterov option dropped"),
    Mutation("engine-bf16-autocast-off", "mambakit/engine/trainer.py",
             '    if precision == "fp32":\n        return contextlib.nullcontext()',
             '    if precision in ("fp32", "bf16"):\n        return contextlib.nullcontext()',
             ENGINE_TESTS, "train.precision=bf16 runs in float32"),
    Mutation("engine-early-stop-patience-off-by-one", "mambakit/engine/trainer.py",
             "stop = patience is not None and self.bad_evals >= patience and epoch > self.config.min_epochs",
             "stop = patience is not None and self.bad_evals > patience and epoch > self.config.min_epochs",
             ENGINE_TESTS, "early stopping one evaluation late"),
    Mutation("engine-early-stop-min-delta-ignored", "mambakit/engine/trainer.py",
             "improved = value >= self.best + self.config.min_delta",
             "improved = value >= self.best",
             ENGINE_TESTS, "min_delta ignored in mode max"),
    Mutation("engine-early-stop-min-epochs-ignored", "mambakit/engine/trainer.py",
             "and epoch > self.config.min_epochs",
             "and epoch > 0",
             ENGINE_TESTS, "min_epochs ignored"),
    Mutation("engine-restore-best-ignored", "mambakit/engine/trainer.py",
             "if es.restore_best and best_path is not None and best_path != self.last_checkpoint:",
             "if False:",
             ENGINE_TESTS, "the final test evaluation uses the last weights, not the best"),
    # -- resume and checkpoints --------------------------------------------------------------------------
    Mutation("engine-resume-restarts-the-epoch", "mambakit/engine/trainer.py",
             "start_batch=start_batch, order=self._epoch_order(epoch))",
             "start_batch=0, order=self._epoch_order(epoch))",
             ENGINE_TESTS, "a mid-epoch resume trains the epoch's first batches again"),
    Mutation("engine-resume-rng-not-restored", "mambakit/engine/trainer.py",
             "            restore_rng_state(state[\"rng\"][env.rank])",
             "            pass",
             ENGINE_TESTS, "dropout / augmentation streams not restored on resume"),
    Mutation("engine-resume-scheduler-not-restored", "mambakit/engine/trainer.py",
             "            scheduler.load_state_dict(saved)",
             "            pass",
             ENGINE_TESTS, "the schedule restarts from step 0 on resume"),
    Mutation("engine-resume-optimizer-not-restored", "mambakit/engine/trainer.py",
             "            optimizer.load_state_dict(saved)",
             "            pass",
             ENGINE_TESTS, "Adam's moments lost on resume"),
    Mutation("engine-resume-ema-not-restored", "mambakit/engine/trainer.py",
             "        if self.ema is not None:\n            self.ema.load_state_dict(state[\"ema\"])",
             "        if False:\n            self.ema.load_state_dict(state[\"ema\"])",
             ENGINE_TESTS, "the EMA restarts from the resumed weights"),
    Mutation("engine-eval-ema-flag-ignored", "mambakit/engine/trainer.py",
             'key = "ema" if use_ema else "model"',
             'key = "model"',
             ENGINE_TESTS + ("tests/engine/test_engine_runner.py", "tests/engine/test_engine_pretrained.py"),
             "evaluate(use_ema=True) / eval --ema scores the model weights"),
    Mutation("engine-drop-last-ignored", "mambakit/engine/trainer.py",
             "drop_last=cfg.drop_last,",
             "drop_last=True,",
             ENGINE_TESTS, "train.drop_last=false drops the last batch anyway"),
    Mutation("engine-max-steps-not-in-schedule", "mambakit/engine/trainer.py",
             "            self.total_steps = min(self.total_steps, cfg.max_steps)",
             "            pass",
             ENGINE_TESTS, "schedules spread over the epochs although max_steps ends the run earlier"),
    Mutation("engine-warmup-start-lr-ignored", "mambakit/engine/optim.py",
             "return config.warmup_start_lr + (peak_lr - config.warmup_start_lr) * epoch / warmup",
             "return peak_lr * epoch / warmup",
             ENGINE_TESTS, "warmup starting from 0 instead of warmup_start_lr"),
    Mutation("engine-artefacts-not-listed", "mambakit/engine/trainer.py",
             "                self.logger.message(format_artefacts(self.run_dir, result.artefacts))",
             "                pass",
             ENGINE_TESTS, "the end of a run does not list what it wrote"),
    Mutation("engine-time-checkpoints-never", "mambakit/engine/trainer.py",
             "due = self.clock() - self._last_save_time >= 60.0 * cfg.checkpoint_every_minutes",
             "due = False",
             ENGINE_TESTS, "checkpoint_every_minutes does nothing"),
    Mutation("engine-run-folder-made-before-start", "mambakit/engine/trainer.py",
             "        _on_main(check, self.env)\n",
             "        _on_main(check, self.env); run_dir.mkdir(parents=True, exist_ok=True)\n",
             ENGINE_TESTS, "a failed start leaves an empty run folder"),
    # -- the forecasting app (tests/apps/timeseries) ------------------------------------------------------
    Mutation('timeseries-ms-descaled-first-column', 'mambakit/apps/timeseries/task.py',
             'scaler.select(slice(-1, None)) if self.config',
             'scaler.select(slice(0, 1)) if self.config',
             ("tests/apps/timeseries",), "MS inverse-scales with the first column's mean / std"),
    Mutation('timeseries-naive-one-step-early', 'mambakit/apps/timeseries/metrics.py',
             'season = x[:, x.shape[1] - period:]',
             'season = x[:, x.shape[1] - period - 1:-1]',
             ("tests/apps/timeseries",), 'seasonal naive one step early'),
    Mutation('timeseries-forecast-lookback-shifted', 'mambakit/apps/timeseries/forecast.py',
             'history = scaler.transform(values[-seq_len:])',
             'history = scaler.transform(values[-seq_len - 1:-1])',
             ("tests/apps/timeseries",), 'forecast looks back one row early'),
    Mutation('timeseries-forecast-calendar-wrong-rows', 'mambakit/apps/timeseries/forecast.py',
             'time_features(hist_dates[-seq_len:], freq)',
             'time_features(hist_dates[-seq_len:] + pd.Timedelta(hours=1), freq)',
             ("tests/apps/timeseries",), "forecast's calendar features of the wrong rows"),
    Mutation('timeseries-forecast-ignores-fill', 'mambakit/apps/timeseries/forecast.py',
             'fill=meta.get("fill", "none"))',
             'fill="none")',
             ("tests/apps/timeseries",), "forecast ignores the run's data.fill"),
    Mutation('timeseries-interpolate-as-ffill', 'mambakit/apps/timeseries/data.py',
             'out[~known, j] = np.interp(t[~known], t[known], values[known, j])',
             'out[~known, j] = values[np.maximum.accumulate(np.where(known, t, 0))[~known], j]',
             ("tests/apps/timeseries",), 'interpolate fills with the previous value'),
    Mutation('timeseries-plot-descaled-column0', 'mambakit/apps/timeseries/task.py',
             '* scaler.std[column] + scaler.mean[column]',
             '* scaler.std[0] + scaler.mean[0]',
             ("tests/apps/timeseries",), 'test-window plot de-scales with column 0'),
    Mutation('timeseries-scaler-std-ddof1', 'mambakit/apps/timeseries/data.py',
             'std = values.std(axis=0)',
             'std = values.std(axis=0, ddof=1)',
             ("tests/apps/timeseries",), "scaler std with ddof=1 (not TSLib's population std)"),
    Mutation('timeseries-long-ids-file-order', 'mambakit/apps/timeseries/data.py',
             'names = sorted(ids.unique())',
             'names = list(ids.unique())',
             ("tests/apps/timeseries",), 'long files: ids in file order instead of sorted'),
)


@dataclass
class Outcome:
    name: str
    file: str
    status: str                # killed | SURVIVED | ERROR
    detail: str
    seconds: float
    tests: tuple[str, ...]


class MutationError(RuntimeError):
    """A mutation that cannot be applied (its text is not in the file exactly once)."""


def apply(mutation: Mutation, root: Path) -> None:
    """Plant `mutation` in the tree at `root`."""
    path = root / mutation.file
    if not path.is_file():
        raise MutationError(f"{mutation.name}: {mutation.file} does not exist")
    text = path.read_text()
    count = text.count(mutation.old)
    if count != 1:
        what = "pattern not found" if count == 0 else f"pattern found {count} times"
        raise MutationError(f"{mutation.name}: {what} in {mutation.file}: {mutation.old!r}")
    path.write_text(text.replace(mutation.old, mutation.new))


def repository_files(root: Path) -> list[str]:
    """The files git tracks or would track; without git, every file outside dot-folders and caches."""
    try:
        out = subprocess.run(["git", "-C", str(root), "ls-files", "-z", "--cached", "--others",
                              "--exclude-standard"], capture_output=True, check=True).stdout
        return [name for name in out.decode().split("\0") if name and (root / name).is_file()]
    except (OSError, subprocess.CalledProcessError):
        files = []
        for folder, dirs, names in os.walk(root):
            dirs[:] = [d for d in dirs if not d.startswith(".") and d != "__pycache__"]
            files += [os.path.relpath(os.path.join(folder, n), root) for n in names]
        return files


def make_copy(root: Path, into: Path) -> Path:
    """Copy the repository to `into`/<name>, with ../shared linked beside it when the original has one."""
    copy = into / root.name
    for name in repository_files(root):
        target = copy / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / name, target)
    shared = root.parent / "shared"
    if shared.is_dir():
        (into / "shared").symlink_to(shared.resolve(), target_is_directory=True)
    return copy


def run_tests(copy: Path, tests: tuple[str, ...], timeout: float) -> tuple[int | None, str]:
    """pytest's exit code in the copy (None on timeout) and the tail of its output."""
    env = {**os.environ, "PYTHONPATH": str(copy), "PYTHONDONTWRITEBYTECODE": "1"}
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-m", "not slow", "-p", "no:cacheprovider", *tests]
    try:
        proc = subprocess.run(command, cwd=copy, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, f"timed out after {timeout:.0f} s"
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    failed = [line for line in lines if line.startswith(("FAILED", "ERROR"))]
    return proc.returncode, (failed[0] if failed else lines[-1] if lines else "")


def check(mutations: list[Mutation], root: Path = ROOT, *, baseline: bool = True, timeout: float = 900.0,
          progress=lambda line: print(line, flush=True)) -> list[Outcome]:
    """Run every mutation in its own fresh copy of `root`; returns one Outcome per mutation."""
    outcomes: list[Outcome] = []
    broken: dict[tuple[str, ...], str] = {}
    with tempfile.TemporaryDirectory(prefix="mambakit-mutate-") as tmp:
        pristine = make_copy(root, Path(tmp) / "pristine")
        if baseline:
            for tests in dict.fromkeys(m.tests for m in mutations):
                code, tail = run_tests(pristine, tests, timeout)
                if code != 0:
                    broken[tests] = f"the tests fail without any mutation (exit {code}): {tail}"
        for i, mutation in enumerate(mutations):
            started = time.perf_counter()
            work = Path(tmp) / f"m{i}"
            work.mkdir()
            copy = work / root.name
            shutil.copytree(pristine, copy, symlinks=True)
            if (Path(tmp) / "pristine" / "shared").exists():
                (work / "shared").symlink_to((Path(tmp) / "pristine" / "shared").resolve(), target_is_directory=True)
            try:
                apply(mutation, copy)
            except MutationError as e:
                outcome = Outcome(mutation.name, mutation.file, "ERROR", str(e), 0.0, mutation.tests)
            else:
                if mutation.tests in broken:
                    status, detail = "ERROR", broken[mutation.tests]
                else:
                    code, tail = run_tests(copy, mutation.tests, timeout)
                    if code == 0:
                        status, detail = "SURVIVED", "every test passed"
                    elif code == 1 or code is None:
                        status, detail = "killed", tail
                    else:   # 2 interrupted (e.g. an import error at collection), 4 usage, 5 nothing collected
                        status, detail = "ERROR", f"pytest exit {code}: {tail}"
                outcome = Outcome(mutation.name, mutation.file, status, detail,
                                  round(time.perf_counter() - started, 1), mutation.tests)
            shutil.rmtree(work, ignore_errors=True)
            outcomes.append(outcome)
            progress(f"[{i + 1}/{len(mutations)}] {outcome.status:8s} {outcome.name} ({outcome.seconds} s)")
    return outcomes


def markdown(outcomes: list[Outcome]) -> str:
    lines = ["| mutation | file | result | s | caught by / detail |", "|---|---|---|---|---|"]
    for o in outcomes:
        detail = o.detail.replace("|", "\\|")
        lines.append(f"| {o.name} | {o.file} | {o.status} | {o.seconds} | {detail[:160]} |")
    killed = sum(o.status == "killed" for o in outcomes)
    lines.append(f"\n{killed} of {len(outcomes)} killed, {sum(o.status == 'SURVIVED' for o in outcomes)} survived, "
                 f"{sum(o.status == 'ERROR' for o in outcomes)} errors")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", action="append", default=[], metavar="PREFIX",
                        help="run the mutations whose name starts with PREFIX (repeatable)")
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    parser.add_argument("--no-baseline", action="store_true", help="skip the unmutated test run")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per test run (a timeout kills)")
    parser.add_argument("--json", metavar="FILE", help="write the outcomes as JSON")
    parser.add_argument("--markdown", metavar="FILE", help="write the table as markdown")
    args = parser.parse_args(argv)
    chosen = [m for m in MUTATIONS if not args.only or m.name.startswith(tuple(args.only))]
    if args.list:
        for m in chosen:
            print(f"{m.name:45s} {m.file:40s} {m.why}")
        return 0
    if not chosen:
        parser.error(f"no mutation name starts with {', '.join(args.only)}")
    outcomes = check(chosen, baseline=not args.no_baseline, timeout=args.timeout)
    table = markdown(outcomes)
    print("\n" + table)
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(o) for o in outcomes], indent=1) + "\n")
    if args.markdown:
        Path(args.markdown).write_text(table + "\n")
    if any(o.status == "ERROR" for o in outcomes):
        return 2
    return 1 if any(o.status == "SURVIVED" for o in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
