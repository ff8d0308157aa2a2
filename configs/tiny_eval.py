"""The packaged config `jaxdpo/configs/tiny_eval.py` (see its docstring), kept here so that
`configs/tiny_eval.py` keeps working from the repository root."""

from jaxdpo.configs.tiny_eval import *  # noqa: F401,F403
from jaxdpo.configs.tiny_eval import get_config  # noqa: F401
