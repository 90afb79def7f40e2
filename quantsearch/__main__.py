"""``python -m quantsearch``: the same as the ``quantsearch`` command."""

from __future__ import annotations

import sys

from quantsearch.cli import main

if __name__ == "__main__":
    sys.exit(main())
