"""hf-to-jax checks that the tokenizer (and a vision model's image processor) loads before it
writes anything; `--tokenizer DIR` takes them from elsewhere, `--no-tokenizer` converts the
weights only (issue 10).

The HF directories are tiny preset models exported by jax-to-hf (weights and config.json, no
tokenizer files); the tokenizers are the shipped ones (`jaxdpo/assets`).
"""

import contextlib
import io as std_io
import os
import shutil
import subprocess
import sys

import jax.numpy as jnp
import pytest
from flax import nnx

from jaxdpo import api, assets
from jaxdpo.cli import convert as cli
from jaxdpo.data import tokenizer_check
from jaxdpo.errors import TokenizerSourceError
from jaxdpo.models import io, registry

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VL_TOKENIZER = assets.path("tiny_vl/tokenizer")  # the demo tokenizer + Qwen2-VL processor of `demo_vl`
TEXT_TOKENIZER = assets.path("tiny_tokenizer")


def _hf_dir(root, family_name: str, preset: str) -> str:
  """An HF directory (config.json + safetensors + generation_config.json, no tokenizer) of a preset."""
  family = registry.get_family(family_name)
  cfg = family.presets[preset]()
  params = nnx.to_pure_dict(nnx.state(family.build(cfg, nnx.Rngs(0), jnp.float32), nnx.Param))
  ck = io.export_model_dir(os.path.join(root, f"{preset}_ck"), family, cfg, params, hf_config=family.config_to_hf(cfg))
  hf = io.jax_to_hf_dir(ck, os.path.join(root, f"{preset}_hf"))
  with open(os.path.join(hf, "generation_config.json"), "w") as f:
    f.write('{"max_new_tokens": 7}')  # the model's file: it must travel, whatever the tokenizer source
  return hf


@pytest.fixture(scope="module")
def vl_hf(tmp_path_factory):
  return _hf_dir(str(tmp_path_factory.mktemp("tokcheck")), "qwen2_5_vl", "demo_vl")


@pytest.fixture(scope="module")
def text_hf(tmp_path_factory):
  return _hf_dir(str(tmp_path_factory.mktemp("tokcheck_text")), "qwen2", "tiny")


def _convert(*args) -> tuple[int, str, str]:
  out, err = std_io.StringIO(), std_io.StringIO()
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    rc = cli.main(["hf-to-jax", *args])
  return rc, out.getvalue(), err.getvalue()


def _nothing_written(out_dir) -> bool:
  parent, name = os.path.split(str(out_dir))
  return not [n for n in os.listdir(parent) if n.startswith(name)]


def _copy(src: str, dst: str, skip=()) -> str:
  shutil.copytree(src, dst, ignore=lambda _d, names: [n for n in names if n in skip])
  return dst


def test_missing_tokenizer_is_one_line_exit_2_naming_the_dir_and_the_flags(vl_hf, tmp_path):
  out = tmp_path / "ck"
  proc = subprocess.run([sys.executable, "-m", "jaxdpo.convert", "hf-to-jax", "--hf-dir", vl_hf, "--out", str(out)],
                        cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 2, proc.stderr
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
  assert f"{vl_hf}: no tokenizer files" in lines[0]
  assert "nothing was written" in lines[0] and "--tokenizer DIR" in lines[0] and "--no-tokenizer" in lines[0]
  assert "tokenizer and image processor" in lines[0]
  assert _nothing_written(out)


def test_vision_model_without_its_image_processor_is_refused(vl_hf, tmp_path):
  src = _copy(vl_hf, str(tmp_path / "hf"))
  for name in os.listdir(VL_TOKENIZER):
    if name != "preprocessor_config.json":
      shutil.copy2(os.path.join(VL_TOKENIZER, name), src)
  rc, _, err = _convert("--hf-dir", src, "--out", str(tmp_path / "ck"))
  assert rc == 2
  assert f"{src}: no image processor (preprocessor_config.json), which the qwen2_5_vl model needs" in err
  assert "--tokenizer DIR" in err and "--no-tokenizer" in err
  assert _nothing_written(tmp_path / "ck")
  # The same files with the processor shipped for another tower (patch 8, not the model's 4).
  shutil.copy2(os.path.join(VL_TOKENIZER, "preprocessor_config.json"), src)
  with open(os.path.join(src, "preprocessor_config.json")) as f:
    text = f.read()
  with open(os.path.join(src, "preprocessor_config.json"), "w") as f:
    f.write(text.replace('"patch_size": 4', '"patch_size": 8'))
  rc, _, err = _convert("--hf-dir", src, "--out", str(tmp_path / "ck"))
  assert rc == 2 and "disagrees with the model's vision tower: patch_size=8 (model: 4)" in err, err
  assert _nothing_written(tmp_path / "ck")


def test_tokenizer_dir_flag_takes_the_files_from_elsewhere(vl_hf, tmp_path):
  out = tmp_path / "ck"
  rc, stdout, err = _convert("--hf-dir", vl_hf, "--out", str(out), "--tokenizer", VL_TOKENIZER)
  assert rc == 0, err
  assert f"wrote {out}" in stdout
  tok_dir = out / "tokenizer"
  assert set(os.listdir(VL_TOKENIZER)) | {"generation_config.json"} == set(os.listdir(tok_dir))
  with open(tok_dir / "generation_config.json") as f:
    assert '"max_new_tokens": 7' in f.read()  # from the model's directory
  family, cfg = io.read_model_meta(str(out))
  assert tokenizer_check.problem(family, cfg, str(tok_dir)) is None  # loads as the jobs load it
  # A --tokenizer DIR that does not hold one is refused, naming DIR.
  rc, _, err = _convert("--hf-dir", vl_hf, "--out", str(tmp_path / "ck2"), "--tokenizer", TEXT_TOKENIZER)
  assert rc == 2 and f"{TEXT_TOKENIZER}: no image processor" in err and "--tokenizer DIR with a" in err
  assert _nothing_written(tmp_path / "ck2")


def test_no_tokenizer_writes_no_tokenizer_dir(vl_hf, tmp_path):
  out = tmp_path / "ck"
  rc, _, err = _convert("--hf-dir", vl_hf, "--out", str(out), "--no-tokenizer")
  assert rc == 0, err
  assert sorted(os.listdir(out)) == ["hf_config.json", "jaxdpo_model.json", "params"]
  with pytest.raises(SystemExit) as e:  # argparse: the two are exclusive
    _convert("--hf-dir", vl_hf, "--out", str(tmp_path / "ck2"), "--no-tokenizer", "--tokenizer", VL_TOKENIZER)
  assert e.value.code == 2


def test_text_model_needs_a_tokenizer_only(text_hf, tmp_path):
  rc, _, err = _convert("--hf-dir", text_hf, "--out", str(tmp_path / "ck0"))
  assert rc == 2 and f"{text_hf}: no tokenizer files" in err and "image processor" not in err
  src = _copy(text_hf, str(tmp_path / "hf"))
  for name in os.listdir(TEXT_TOKENIZER):
    shutil.copy2(os.path.join(TEXT_TOKENIZER, name), src)
  rc, _, err = _convert("--hf-dir", src, "--out", str(tmp_path / "ck"))
  assert rc == 0, err
  assert set(os.listdir(TEXT_TOKENIZER)) <= set(os.listdir(tmp_path / "ck" / "tokenizer"))
  # A broken tokenizer.json is caught by loading it, not by the file's name.
  with open(os.path.join(src, "tokenizer.json"), "w") as f:
    f.write("{not json")
  rc, _, err = _convert("--hf-dir", src, "--out", str(tmp_path / "ck2"))
  assert rc == 2 and f"{src}: the tokenizer does not load" in err and len(err.strip().splitlines()) == 1
  assert _nothing_written(tmp_path / "ck2")


def test_api_convert_checks_the_same_way(vl_hf, tmp_path):
  with pytest.raises(TokenizerSourceError, match=r"no tokenizer files.*Pass tokenizer=DIR .* or tokenizer=False"):
    api.convert(vl_hf, str(tmp_path / "ck"))
  assert _nothing_written(tmp_path / "ck")
  api.convert(vl_hf, str(tmp_path / "ck"), tokenizer=VL_TOKENIZER)
  assert os.path.isfile(tmp_path / "ck" / "tokenizer" / "preprocessor_config.json")


def test_library_conversion_never_writes_a_tokenizer_dir_without_a_tokenizer(vl_hf, tmp_path):
  """`io.hf_to_jax_dir` without the check (the tests' helpers use it): no generation_config-only dir."""
  io.hf_to_jax_dir(vl_hf, str(tmp_path / "ck"))
  assert not os.path.exists(tmp_path / "ck" / "tokenizer")


def test_readme_and_help_name_the_same_flags(capsys):
  import re
  with open(os.path.join(ROOT, "README.md")) as f:
    usage = [l for l in f.read().splitlines() if l.startswith("python -m jaxdpo.convert hf-to-jax --hf-dir HF_DIR")]
  assert len(usage) == 1
  with pytest.raises(SystemExit):
    cli.main(["hf-to-jax", "--help"])
  help_text = capsys.readouterr().out
  assert set(re.findall(r"--[a-z-]+", usage[0])) == set(re.findall(r"--[a-z-]+", help_text)) - {"--help",
                                                                                                   "--overwrite"}
  assert "--tokenizer DIR | --no-tokenizer" in cli.__doc__
