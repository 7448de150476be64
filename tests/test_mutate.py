"""benchmarks/mutate.py: a mutation is planted only where its text occurs exactly once (otherwise a loud error,
never a silent skip), each runs in its own copy (the repository is never touched), a mutant whose tests fail
is killed, one whose tests pass survives, and tests that fail without any mutation make an error, not a kill.
Checked on a tiny repository made here; plus: every engine mutation still applies to the engine's code."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load():
    spec = importlib.util.spec_from_file_location("mambakit_mutate", ROOT / "benchmarks" / "mutate.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


mutate = _load()


@pytest.fixture
def tiny(tmp_path):
    root = tmp_path / "repo"
    (root / "calc").mkdir(parents=True)
    (root / "tests").mkdir()
    (root / "calc" / "__init__.py").write_text("def add(a, b):\n    return a + b\n\n\ndef double(a):\n    return 2 * a\n")
    (root / "tests" / "test_add.py").write_text("from calc import add\n\n\ndef test_add():\n    assert add(2, 3) == 5\n")
    (root / "tests" / "test_weak.py").write_text("from calc import double\n\n\ndef test_double():\n"
                                                 "    assert double(2) >= 0\n")
    (root / "tests" / "test_broken.py").write_text("def test_broken():\n    assert False\n")
    return root


def test_killed_survived_and_errors_on_a_tiny_repository(tiny):
    M = mutate.Mutation
    both = ("tests/test_add.py", "tests/test_weak.py")
    mutations = [M("add-subtracts", "calc/__init__.py", "return a + b", "return a - b", both),
                 M("double-squares", "calc/__init__.py", "return 2 * a", "return a * a", both),
                 M("renamed", "calc/__init__.py", "return a * 3", "return 0", ("tests/test_add.py",)),
                 M("ambiguous", "calc/__init__.py", "return", "yield", ("tests/test_add.py",)),
                 M("broken-tests", "calc/__init__.py", "return 2 * a", "return 0", ("tests/test_broken.py",))]
    before = (tiny / "calc" / "__init__.py").read_text()
    outcomes = mutate.check(mutations, tiny, timeout=120, progress=lambda line: None)
    status = {o.name: (o.status, o.detail) for o in outcomes}
    assert status["add-subtracts"][0] == "killed" and "test_add" in status["add-subtracts"][1]
    assert status["double-squares"] == ("SURVIVED", "every test passed")   # the weak test misses it
    assert status["renamed"][0] == "ERROR" and "pattern not found in calc/__init__.py" in status["renamed"][1]
    assert status["ambiguous"][0] == "ERROR" and "pattern found 2 times" in status["ambiguous"][1]
    assert status["broken-tests"][0] == "ERROR" and "fail without any mutation" in status["broken-tests"][1]
    assert (tiny / "calc" / "__init__.py").read_text() == before              # the original is never edited
    table = mutate.markdown(outcomes)
    assert "| add-subtracts | calc/__init__.py | killed |" in table and "1 of 5 killed, 1 survived, 3 errors" in table


def test_every_mutation_applies_to_the_current_code(tmp_path):
    # the mutations must keep matching the code: a rewrite that loses one is caught here, loudly
    for mutation in mutate.MUTATIONS:
        target = tmp_path / mutation.file
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text((ROOT / mutation.file).read_text())
        mutate.apply(mutation, tmp_path)
        assert mutation.new in target.read_text()
        for test in mutation.tests:
            assert (ROOT / test.split("::")[0]).exists(), test
