"""The packaged config `jaxdpo/configs/nanonets_ocr2_3b_eval.py` (see its docstring), kept here so that
`configs/nanonets_ocr2_3b_eval.py` keeps working from the repository root."""

from jaxdpo.configs.nanonets_ocr2_3b_eval import *  # noqa: F401,F403
from jaxdpo.configs.nanonets_ocr2_3b_eval import get_config  # noqa: F401
