"""``python -m permask``: the same as the ``permask`` command."""

import sys

from permask.cli import main

sys.exit(main())
