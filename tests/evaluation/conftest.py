from __future__ import annotations

import sys
from pathlib import Path

# The tests import the synthetic scorers by module name (as the CLI's table would name a
# service's module), whatever pytest's import mode.
if str(Path(__file__).parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).parent))
