"""``python -m hawqlib``: the companion's command line (:mod:`hawqlib.repro.cli`)."""
import sys

from hawqlib.repro.cli import main

if __name__ == "__main__":
    sys.exit(main())
