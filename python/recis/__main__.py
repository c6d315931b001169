"""``python -m recis``: the ``recis`` command (``recis.cli``), for where the
console script is not on PATH (a virtualenv not activated, a source tree on
PYTHONPATH)."""

import sys

from recis.cli import main

sys.exit(main())
