"""`python -m jaxdpo.convert`: kept as the entry point; the code lives in `jaxdpo.cli.convert`."""

import sys

from jaxdpo.cli.convert import main

if __name__ == "__main__":
  sys.exit(main())  # the exit status is the CLI's contract (2 = refused)
