"""The packaged config `jaxdpo/configs/demo_degeneration.py` (see its docstring), kept here so that
`configs/demo_degeneration.py` keeps working from the repository root."""

from jaxdpo.configs.demo_degeneration import *  # noqa: F401,F403
from jaxdpo.configs.demo_degeneration import get_config  # noqa: F401
