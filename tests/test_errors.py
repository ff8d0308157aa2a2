"""One `UserError` family for bad input: one line and exit 2 from the CLI; bugs keep their traceback."""

import pytest

from jaxdpo import errors
from jaxdpo.cli import main as jmain
from jaxdpo.data import records
from jaxdpo.data.vision import images
from jaxdpo.models import convert_table, registry
from jaxdpo.objectives import dpo_losses
from jaxdpo.parallel import distributed, memory, sharding
from tests._dpo_helpers import run_main


def test_error_classes_are_user_errors_and_keep_their_old_bases():
  kept = {records.DataError: ValueError, images.ImageError: ValueError, convert_table.ConversionError: ValueError,
          sharding.MeshConfigError: ValueError, memory.MemoryPlanError: ValueError,
          distributed.DistributedInitError: RuntimeError, errors.CheckpointNotFoundError: FileNotFoundError,
          errors.OutputExistsError: FileExistsError, registry.UnknownFamilyError: KeyError}
  for cls, old in kept.items():
    assert issubclass(cls, errors.UserError) and issubclass(cls, old), cls


def test_user_error_is_one_line_and_exit_2(capsys):
  def bad():
    raise errors.ConfigError("config.train.batch_size=3 is not divisible by config.train.grad_accum=2")
  with pytest.raises(SystemExit) as info:
    jmain.exit_on_user_error(bad)
  assert info.value.code == 2
  assert capsys.readouterr().err == "error: config.train.batch_size=3 is not divisible by config.train.grad_accum=2\n"


def test_internal_errors_propagate():
  """A ValueError that is not a UserError is a bug: it is not turned into `error: ...`."""
  def bug():
    raise ValueError("shapes (3,) and (4,) do not broadcast")
  with pytest.raises(ValueError, match="broadcast"):
    jmain.exit_on_user_error(bug)
  assert jmain.exit_on_user_error(lambda: 7) == 7


def test_unknown_family_names_the_key_without_quotes():
  with pytest.raises(errors.ConfigError) as info:
    registry.get_family("llama9")
  assert str(info.value).startswith("unknown model family 'llama9'")


@pytest.mark.parametrize("loss_type", ["hinge", "ipo"])
def test_label_smoothing_refused_for_losses_without_it(loss_type):
  with pytest.raises(errors.ConfigError, match=r"config\.dpo\.label_smoothing=0.1 .*" + loss_type):
    dpo_losses.DPOLossConfig(loss_type=loss_type, label_smoothing=0.1)
  dpo_losses.DPOLossConfig(loss_type=loss_type)  # 0 is fine
  dpo_losses.DPOLossConfig(loss_type="sigmoid", label_smoothing=0.1)


def test_cli_refuses_label_smoothing_with_hinge(tmp_path):
  r = run_main(tmp_path / "w", "--config.dpo.loss_type=hinge", "--config.dpo.label_smoothing=0.2")
  assert r.returncode == 2, r.stderr[-3000:]
  assert "config.dpo.label_smoothing=0.2" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("overrides,message", [
    ({"loss_type": "sigmoid,sigmod"}, r"config\.dpo\.loss_type='sigmoid,sigmod': expected one of .*'sigmod' is not one"),
    ({"loss_type": "sigmoid,sft", "loss_weights": "1"}, r"config\.dpo\.loss_weights='1': must have the same length"),
    ({"loss_type": "bco_pair", "f_divergence_type": "js_divergence"},
     r"config\.dpo\.f_divergence_type='js_divergence' is only supported for the loss types .*bco_pair"),
    ({"f_divergence_type": "kl"}, r"config\.dpo\.f_divergence_type='kl': expected one of 'reverse_kl'"),
    ({"loss_type": "exo_pair"}, r"config\.dpo\.label_smoothing=0.0: label smoothing must be greater than 0.0"),
    ({"ld_alpha": 1.5}, r"config\.dpo\.ld_alpha=1.5: must be in \[0, 1\]"),
    ({"loss_type": "sigmoid,sft", "rpo_alpha": 0.5}, r"config\.dpo\.rpo_alpha=0.5 with 'sft'"),
])
def test_loss_family_settings_refused_naming_the_key(overrides, message):
  from jaxdpo.jobs import validate
  from tests._dpo_helpers import demo_config
  with pytest.raises(errors.ConfigError, match=message):
    dpo_losses.DPOLossConfig(**overrides)
  config = demo_config(**{f"dpo.{k}": v for k, v in overrides.items()})
  with pytest.raises(errors.ConfigError, match=message):  # and before any data is read or model built
    validate.check(config)


def test_batch_sorting_loss_refuses_grad_accum():
  from jaxdpo.jobs import validate
  from tests._dpo_helpers import demo_config
  config = demo_config(**{"dpo.loss_type": "aot", "train.batch_size": 4, "train.grad_accum": 2})
  with pytest.raises(errors.ConfigError, match=r"config\.train\.grad_accum=2 with config\.dpo\.loss_type='aot'"):
    validate.check(config)
  validate.check(demo_config(**{"dpo.loss_type": "aot", "train.batch_size": 4, "train.grad_accum": 1}))
  validate.check(demo_config(**{"dpo.loss_type": "sigmoid,sft", "dpo.loss_weights": "1,0.5",
                                "train.batch_size": 4, "train.grad_accum": 2}))
