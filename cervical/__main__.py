"""``python -m cervical COMMAND ...``: the same command line as ``python cli.py`` and ``cervical``."""

import sys

from cli import main

if __name__ == "__main__":
    sys.exit(main())
