"""`python -m jaxdpo.convert`: kept as the entry point; the code lives in `jaxdpo.cli.convert`."""

from jaxdpo.cli.convert import main

if __name__ == "__main__":
  main()
