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
