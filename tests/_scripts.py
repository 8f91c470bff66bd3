"""Import an entry script (whose file name may hold '+') as a module, for tests that call its main()."""

import importlib.util
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]


def load_script(rel: str) -> ModuleType:
    """The script at ROOT/rel, imported under a name derived from its file name."""
    path = ROOT / rel
    spec = importlib.util.spec_from_file_location("script_" + path.stem.replace("+", "_"), path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
