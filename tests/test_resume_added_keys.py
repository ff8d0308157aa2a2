"""Resuming a run started before a config key existed: the new key at its default is no change,
the same key set to something else is refused by name (no training: the check reads config.json)."""

import json
import os

import pytest

from jaxdpo.errors import ConfigError
from jaxdpo.jobs import defaults, resume_config


def _workdir_of_an_older_version(tmp_path, drop: str):
  """A workdir with a checkpoint and a config.json that lacks the dotted key `drop`."""
  config = defaults.base()
  config.job = "dpo"
  saved = json.loads(config.to_json_best_effort())
  section, key = drop.split(".")
  del saved[section][key]
  os.makedirs(tmp_path / "checkpoints" / "4")
  with open(tmp_path / "config.json", "w") as f:
    json.dump(saved, f)
  return config


def test_a_key_added_since_the_run_started_at_its_default_resumes(tmp_path):
  config = _workdir_of_an_older_version(tmp_path, "dpo.ld_alpha")
  resume_config.check(config, str(tmp_path))  # no error


def test_a_key_added_since_the_run_started_but_set_is_refused_by_name(tmp_path):
  config = _workdir_of_an_older_version(tmp_path, "dpo.ld_alpha")
  config.dpo.ld_alpha = 0.5
  with pytest.raises(ConfigError, match=r"dpo\.ld_alpha: None -> 0\.5"):
    resume_config.check(config, str(tmp_path))


def test_a_changed_existing_key_is_still_refused(tmp_path):
  config = _workdir_of_an_older_version(tmp_path, "dpo.ld_alpha")
  config.dpo.beta = 0.3
  with pytest.raises(ConfigError, match=r"dpo\.beta: 0\.1 -> 0\.3"):
    resume_config.check(config, str(tmp_path))
