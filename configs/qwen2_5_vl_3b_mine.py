"""The packaged config `jaxdpo/configs/qwen2_5_vl_3b_mine.py` (see its docstring), kept here so that
`configs/qwen2_5_vl_3b_mine.py` keeps working from the repository root."""

from jaxdpo.configs.qwen2_5_vl_3b_mine import *  # noqa: F401,F403
from jaxdpo.configs.qwen2_5_vl_3b_mine import get_config  # noqa: F401
