"""One copy of mambakit.kernels.triton_scan loaded with TRITON_INTERPRET=1, shared by the test files that run the
Triton kernels on CPU tensors (tests/kernels/test_triton_scan.py, tests/core/test_memory_efficient.py).

The interpreter is chosen when a kernel is decorated, i.e. when its module is imported. Other test files may
already have imported the module without it, so the copy is loaded under its own name with TRITON_INTERPRET=1
set just for that import; the shared `mambakit.kernels.triton_scan` is left as it was. The copy is registered in
sys.modules under MODULE_NAME, so a scan backend can name it ("<MODULE_NAME>:selective_scan_triton").
"""

import importlib.util
import os
import sys

MODULE_NAME = "_mambakit_triton_scan_interpreted"


def load_interpreted_triton_scan():
    if MODULE_NAME in sys.modules:
        return sys.modules[MODULE_NAME]
    spec = importlib.util.find_spec("mambakit.kernels.triton_scan")
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        module = importlib.util.module_from_spec(importlib.util.spec_from_file_location(MODULE_NAME, spec.origin))
        module.__spec__.loader.exec_module(module)
    finally:
        if previous is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = previous
    assert module.is_interpreted()
    sys.modules[MODULE_NAME] = module
    return module
