"""The packaged config `jaxdpo/configs/tiny_vl.py` (see its docstring), kept here so that
`configs/tiny_vl.py` keeps working from the repository root."""

from jaxdpo.configs.tiny_vl import *  # noqa: F401,F403
from jaxdpo.configs.tiny_vl import get_config  # noqa: F401
