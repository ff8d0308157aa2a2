"""The packaged config `jaxdpo/configs/tiny_dpo.py` (see its docstring), kept here so that
`configs/tiny_dpo.py` keeps working from the repository root."""

from jaxdpo.configs.tiny_dpo import *  # noqa: F401,F403
from jaxdpo.configs.tiny_dpo import get_config  # noqa: F401
