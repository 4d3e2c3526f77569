"""The reliability suite imports its helpers and failing models as `tests.reliability.*`."""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # `module:tests.reliability.fixtures:...` models, in-process too
    sys.path.insert(0, str(REPO))
