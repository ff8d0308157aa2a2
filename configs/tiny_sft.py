"""The packaged config `jaxdpo/configs/tiny_sft.py` (see its docstring), kept here so that
`configs/tiny_sft.py` keeps working from the repository root."""

from jaxdpo.configs.tiny_sft import *  # noqa: F401,F403
from jaxdpo.configs.tiny_sft import get_config  # noqa: F401
