"""The offline test models and the installed command itself."""

import shutil
import subprocess
import sys
from pathlib import Path

import torch


def test_tiny_model_loads_with_auto_classes(tiny_model):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    cfg = AutoConfig.from_pretrained(tiny_model)
    assert cfg.model_type == "llama" and cfg.num_hidden_layers == 2
    assert cfg.hidden_size // cfg.num_attention_heads >= 32  # vLLM's CPU attention needs head_dim >= 32
    tok = AutoTokenizer.from_pretrained(tiny_model)
    assert None not in (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) and tok.chat_template
    assert 256 < len(tok) <= 512
    m = AutoModelForCausalLM.from_pretrained(tiny_model)
    assert (Path(tiny_model) / "model.safetensors").exists()
    logp = m(torch.tensor([[1, 50, 60]])).logits.log_softmax(-1)
    assert torch.isfinite(logp).all() and logp.shape == (1, 3, len(tok))


def test_console_script_help_lists_subcommands():
    exe = shutil.which("prefpipe", path=str(Path(sys.executable).parent))
    assert exe, "the prefpipe console script is not installed in this environment"
    out = subprocess.run([exe, "--help"], capture_output=True, text=True, check=True).stdout
    for sub in ("data", "precompute", "inspect", "train", "pipeline"):
        assert f"  {sub} " in out
    mod = subprocess.run([sys.executable, "-m", "prefpipe", "data", "--help"], capture_output=True, text=True)
    assert mod.returncode == 0 and "check" in mod.stdout


def test_a_missing_data_file_is_reported_before_transformers_is_imported(tmp_path):
    """`precompute` with a data path that does not exist fails on the data check, before it pays the second or so
    that importing transformers (and, through it, torch) costs."""
    code = ("import runpy, sys\n"
            "sys.argv = ['prefpipe', 'precompute', '--model', 'm', '--data', 'missing.jsonl', '--out', 'o']\n"
            "try:\n    runpy.run_module('prefpipe', run_name='__main__')\n"
            "except SystemExit as e:\n    print(e.code, 'transformers' in sys.modules, 'torch' in sys.modules)\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert "missing.jsonl" in res.stderr and "no such file" in res.stderr, res.stderr
    assert res.stdout.split() == ["2", "False", "False"], res.stdout
