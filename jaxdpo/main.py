"""`python -m jaxdpo.main`: kept as the entry point; the code lives in `jaxdpo.cli.main`."""

from jaxdpo.cli.main import cli

if __name__ == "__main__":
  cli()
