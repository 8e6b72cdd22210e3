import os
import shutil
import subprocess
import sys

import pytest
import torch

from brep_rl import SteeringConfig, SteeringVectors, load_base
from brep_rl.cli import main as cli_main
from brep_rl.model import gguf_as_f32, gguf_to_hf_folder, smollm2_gguf
from testing_utils import make_tiny


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_load_base_from_an_hf_folder(tmp_path, tokenizer, arch):
    tiny = make_tiny(arch, len(tokenizer), tokenizer.pad_token_id)
    tiny.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    model, tok = load_base(str(tmp_path / "m"))
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())
    assert tok.pad_token_id is not None and tok.padding_side == "left"
    assert model.name_or_path == str(tmp_path / "m")
    steer = SteeringVectors.attach(model, SteeringConfig(mode="bias+prefix"))
    assert steer.config.model_type == arch and steer.config.base_model == str(tmp_path / "m")


def test_load_base_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.gguf: GGUF file not found"):
        load_base(str(tmp_path / "missing.gguf"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="needs a config.json"):
        load_base(str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="not an HF model folder"):
        load_base("./no/such/model")


def test_inspect_prints_config_and_norms(tmp_path, tiny_llama, capsys):
    steer = SteeringVectors.attach(tiny_llama, SteeringConfig(mode="bias+prefix", layers=[1, 2], radius=1.5))
    with torch.no_grad():
        steer.bias.fill_(0.5)
    steer.save_pretrained(tmp_path / "vec")
    assert cli_main(["inspect", str(tmp_path / "vec")]) == 0
    out = capsys.readouterr().out
    assert "tiny-llama (llama, hidden 64, 3 layers)" in out and "radius 1.5" in out
    assert "      2    4.0000    0.0000" in out  # layer 2: |0.5 * ones(64)| = 4, prefix still zero
    assert cli_main(["inspect", str(tmp_path / "nope")]) == 2
    assert "artifact folder not found" in capsys.readouterr().err


@pytest.mark.slow
def test_concurrent_gguf_conversion_makes_one_valid_cache(tmp_path):
    """Two processes converting the same GGUF at once: one converts, the other waits and reuses it."""
    env = dict(os.environ, BREP_RL_CACHE=str(tmp_path), OMP_NUM_THREADS="1")
    code = "from brep_rl.model import gguf_as_f32, gguf_to_hf_folder, smollm2_gguf; print(gguf_to_hf_folder(smollm2_gguf()))"
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outs]
    folders = {out.strip().splitlines()[-1] for out, _ in outs}
    assert len(folders) == 1
    entries = sorted(p.name for p in (tmp_path / "hf").iterdir())
    assert len(entries) == 2 and entries[1].endswith(".lock"), entries  # the folder and its lock, no temp folder
    assert (tmp_path / "hf" / entries[0] / "model.safetensors").is_file()


@pytest.mark.slow
def test_a_reinstalled_gguf_reuses_the_conversion(tmp_path):
    """A fresh venv installs the same GGUF with a new date: the cached conversions are found by content."""
    copy = tmp_path / smollm2_gguf().name
    shutil.copyfile(smollm2_gguf(), copy)
    os.utime(copy, (1e9, 1e9))
    assert gguf_to_hf_folder(copy) == gguf_to_hf_folder(smollm2_gguf())
    assert gguf_as_f32(copy) == gguf_as_f32(smollm2_gguf())


@pytest.mark.slow
def test_smollm2_alias_loads_frozen_with_a_pad_token(smollm2):
    model, tok = smollm2
    assert (model.config.model_type, model.config.num_hidden_layers, model.config.hidden_size) == ("llama", 30, 576)
    assert model.name_or_path == "smollm2-135m" and not model.training
    assert not any(p.requires_grad for p in model.parameters())
    assert tok.pad_token_id == 2 and tok.padding_side == "left"
    assert gguf_to_hf_folder(smollm2_gguf()).is_dir()
