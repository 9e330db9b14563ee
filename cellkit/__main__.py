"""``python -m cellkit`` runs the command line ([`cellkit.cli.main`][])."""

from __future__ import annotations

import sys

from cellkit.cli import main

if __name__ == "__main__":
    sys.exit(main())
