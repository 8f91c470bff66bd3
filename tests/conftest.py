"""Test-session set-up: scripts started by the tests import the project from this checkout."""

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The test process itself gets the checkout from pytest's `pythonpath` setting; child processes
# (the README's scripts, torchrun workers) get it here, so a test never runs an installed copy.
os.environ["PYTHONPATH"] = os.pathsep.join(
    p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p
)
