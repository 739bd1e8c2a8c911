"""scripts/make_tiny_model.py writes a model directory vLLM's dummy loader and kvgate's tokenizer accept,
the same on every run (its tokenizer is trained on a seeded corpus)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from prefixindex.tokenizer import HFTokenizer

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "make_tiny_model.py"
FILES = ["config.json", "generation_config.json", "special_tokens_map.json", "tokenizer.json",
         "tokenizer_config.json"]


def make(out: Path, *args: str) -> Path:
    cmd = [sys.executable, str(SCRIPT), str(out), *args]
    subprocess.run(cmd, check=True, capture_output=True, timeout=60)
    return out


def test_writes_a_llama_config_and_a_tokenizer_with_bos(tmp_path: Path) -> None:
    model = make(tmp_path / "tiny")
    assert sorted(p.name for p in model.iterdir()) == FILES
    config = json.loads((model / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["vocab_size"] == 1024
    assert config["hidden_size"] == config["num_attention_heads"] * config["head_dim"] == 128
    assert (config["bos_token_id"], config["eos_token_id"]) == (1, 2)
    tok = HFTokenizer(str(model))
    ids = tok.encode("the cache prefix of the gateway")
    assert ids[0] == 1 and len(ids) > 1 and max(ids) < 1024


def test_the_same_model_on_every_run(tmp_path: Path) -> None:
    a, b = make(tmp_path / "a"), make(tmp_path / "b", "--heads", "4", "--layers", "3")
    assert (a / "tokenizer.json").read_bytes() == (b / "tokenizer.json").read_bytes()
    config = json.loads((b / "config.json").read_text())
    assert (config["hidden_size"], config["num_hidden_layers"], config["intermediate_size"]) == (256, 3, 512)
