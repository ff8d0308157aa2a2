"""The packaged config `jaxdpo/configs/tiny_mine.py` (see its docstring), kept here so that
`configs/tiny_mine.py` keeps working from the repository root."""

from jaxdpo.configs.tiny_mine import *  # noqa: F401,F403
from jaxdpo.configs.tiny_mine import get_config  # noqa: F401
