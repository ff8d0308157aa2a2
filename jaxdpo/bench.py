"""`python -m jaxdpo.bench`: kept as the entry point; the code lives in `jaxdpo.cli.bench`."""

from jaxdpo.cli.bench import main

if __name__ == "__main__":
  main()
