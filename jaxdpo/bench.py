"""`python -m jaxdpo.bench`: kept as the entry point; the code lives in `jaxdpo.cli.bench`."""

import sys

from jaxdpo.cli.bench import main

if __name__ == "__main__":
  sys.exit(main())  # the exit status is the CLI's contract (2 = refused)
