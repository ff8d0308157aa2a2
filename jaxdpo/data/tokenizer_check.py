"""Whether a directory holds a tokenizer (and, for vision-language models, an image processor)
that the jobs can load, checked before `hf-to-jax` writes anything.

A converted checkpoint's `tokenizer/` is what every job reads as `data.tokenizer`; one that does
not load fails only later, in another job. The check loads them the way the jobs do: the
tokenizer through `tokenize.load_tokenizer`, the image processor through the family's vision
adapter (which also checks the processor against the vision tower and the image token ids).
"""

from __future__ import annotations

import os

from jaxdpo.data import tokenize
from jaxdpo.data.vision import adapters
from jaxdpo.errors import TokenizerSourceError
from jaxdpo.models import registry
from jaxdpo.models.io import TOKENIZER_OWN_FILES as TOKENIZER_FILES

PROCESSOR_FILE = "preprocessor_config.json"


def _one_line(e: Exception) -> str:
  text = " ".join(str(e).split())
  return text if len(text) <= 300 else text[:297] + "..."


def problem(family: registry.Family, model_cfg, directory: str) -> str | None:
  """What keeps `directory` from serving as the model's tokenizer directory, or None if nothing.

  Args:
    family: the model's family (vision families also need the image processor).
    model_cfg: the family's config (image token ids, the vision tower's sizes).
    directory: the directory to check.

  Returns:
    One line naming the directory and what is missing or broken, or None.
  """
  if not os.path.isdir(directory):
    return f"{directory}: no such directory"
  present = sorted(os.listdir(directory))
  if not any(name in present for name in TOKENIZER_FILES):
    return f"{directory}: no tokenizer files (none of {', '.join(TOKENIZER_FILES)})"
  try:
    tok = tokenize.load_tokenizer(directory)
  except Exception as e:  # DataError from load_tokenizer, or whatever a broken file raises
    return f"{directory}: the tokenizer does not load ({_one_line(e)})"
  if family.vision_adapter is None:
    return None
  if PROCESSOR_FILE not in present:
    return (f"{directory}: no image processor ({PROCESSOR_FILE}), which the {family.name} model needs "
            "for its images")
  try:
    adapters.adapter_for(family, model_cfg, tok, directory)
  except Exception as e:
    return f"{directory}: the image processor or the image tokens do not fit the model ({_one_line(e)})"
  return None


def require(family: registry.Family, model_cfg, directory: str, *, given: bool, pass_dir: str = "--tokenizer DIR",
            skip: str = "--no-tokenizer"):
  """Refuses a tokenizer source the jobs could not load, in one line that says what to pass.

  Args:
    family, model_cfg, directory: as for `problem`.
    given: whether `directory` was named explicitly (else it is the HF directory itself).
    pass_dir, skip: how the caller spells "take the files from DIR" and "no tokenizer" (CLI flags
      by default; `jaxdpo.api.convert` spells its keyword arguments).

  Raises:
    TokenizerSourceError: naming the directory, what is missing or broken, and both options.
  """
  found = problem(family, model_cfg, directory)
  if found is None:
    return
  what = "tokenizer and image processor" if family.vision_adapter else "tokenizer"
  fix = (f"Pass {pass_dir} with a {what} that loads" if given else
         f"Pass {pass_dir} to take the {what} files from another directory")
  raise TokenizerSourceError(f"{found}; nothing was written. {fix}, or {skip} to convert the weights only")
