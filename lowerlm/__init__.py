"""lowerlm: lowers PyTorch decoder-only language models to fast kernels.

The stages live in folders at the repository root (``ir/``, ``passes/``, ``frontend/``, ``codegen/``,
``runtime/``) and are imported as ``lowerlm.<stage>``. An install maps them into this package; in a checkout,
the repository root is appended to this package's ``__path__`` so the same names resolve. Attributes are
loaded lazily (PEP 562) so that ``import lowerlm.ir`` stays light.
"""

from __future__ import annotations

import importlib
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent
if (_ROOT / "ir" / "__init__.py").is_file() and str(_ROOT) not in __path__:
    __path__.append(str(_ROOT))

__version__ = "0.1.0"

# public name -> module that defines it
_LAZY = {
    "errors": "lowerlm.errors",
    "ir": "lowerlm.ir",
    "passes": "lowerlm.passes",
    "codegen": "lowerlm.codegen",
    "LowerlmError": "lowerlm.errors",
    "load": "lowerlm.models",
    "compile_model": "lowerlm.compile",
    "CompiledModel": "lowerlm.compile",
    "calibrate": "lowerlm.calibrate",
}


def __getattr__(name: str):
    if name in _LAZY:
        module = importlib.import_module(_LAZY[name])
        value = module if _LAZY[name].endswith("." + name) else getattr(module, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'lowerlm' has no attribute '{name}'")


def __dir__():
    return sorted(list(globals()) + list(_LAZY))
