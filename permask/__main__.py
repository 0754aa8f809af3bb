"""``python -m permask``: the same as the ``permask`` command."""

import sys

from permask.cli import main

if __name__ == "__main__":  # not in the worker processes of --jobs, which import this module
    sys.exit(main())
