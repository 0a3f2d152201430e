"""Registry tests: the shared fixture modules (``flux_fixtures``, ``bad_files``) live beside
this file and are importable from every test folder below it."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
