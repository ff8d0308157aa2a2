"""The shipped experiment configs, packaged so that `--config NAME.py` works from any directory.

`python -m jaxdpo.main --config tiny_dpo.py` (or `configs/tiny_dpo.py`, or a path to any config
file) is resolved by `jaxdpo.cli.config_paths`; `python -m jaxdpo.main --help` lists them.
"""
