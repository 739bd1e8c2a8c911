"""Write a tiny random-weight Llama model directory for real vLLM's `--load-format dummy`.

    /opt/vllm-venv/bin/python scripts/make_tiny_model.py OUT_DIR [--hidden 128 --layers 2 --heads 2]

No weights are written (vLLM's dummy loader fills them randomly): only config.json,
generation_config.json, and a byte-level BPE tokenizer (tokenizer.json, tokenizer_config.json with a
chat template, special_tokens_map.json) trained on a corpus this script generates from a fixed seed, so
the same `tokenizers` version gives the same token ids on every machine. Needs only `tokenizers` (in
vLLM's venv and in kvgate's); ~2 s. The recorded model in tests/fixtures/vllm/model is what the tests
use; this script makes a fresh one for scripts/capture_vllm.py and manual runs.

CPU attention needs head_dim in {32, 64, 80, ...}: the heads are 64 wide, so hidden = 64 * heads.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections.abc import Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

VOCAB_SIZE = 1024
HEAD_DIM = 64
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
# Common English words plus a little code and chat syntax: enough distinct pieces for 1024 merges.
WORDS = """
the of and to in is that it was for on are as with his they at be this from have or by one had not but
what all were when we there can an your which their said if do will each about how up out them then she
many some so these would other into has more her two like him see time could no make than first been its
who now people my made over did down only way find use may water long little very after words called
just where most know get through back much before go good new write our used me man too any day same
right look think also around another came come work three word must because does part even place well
such here take why things help put years different away again off went old number great tell men say
small every found still between name should home big give air line set own under read last never us left
end along while might next sound below saw something thought both few those always looks show large
often together asked house world going want school important until form food keep children feet land
side without boy once animals life enough took sometimes four head above kind began almost live page got
earth need far hand high year mother light parts country father let night following picture being study
second eyes soon times story boys since white days ever paper hard near sentence better best across
during today others however sure means knew try told young miles sun ways thing whole hear example heard
several change answer room sea against top turned learn point city play toward five using himself usually
model request token cache prefix block router gateway pod server client latency throughput prompt
decode prefill queue batch memory index event stream reply question system user assistant value error
def return class import self none true false async await print list dict str int float yield lambda
""".split()
PUNCTUATION = [".", ",", "?", "!", ":", ";", " -", "'s", "(", ")", '"']


def corpus(seed: int = 0, lines: int = 4000) -> Iterator[str]:
    """Deterministic training text: sentences of WORDS, numbers, punctuation and chat-role markers."""
    rng = random.Random(seed)
    roles = ["system", "user", "assistant"]
    for _ in range(lines):
        parts: list[str] = []
        if rng.random() < 0.1:
            parts.append(f"<|{rng.choice(roles)}|>\n")
        for _ in range(rng.randint(4, 24)):
            r = rng.random()
            if r < 0.06:
                parts.append(str(rng.randint(0, 9999)))
            else:
                word = rng.choice(WORDS)
                parts.append(word.capitalize() if r > 0.95 else word)
            if rng.random() < 0.08:
                parts[-1] += rng.choice(PUNCTUATION)
        yield " ".join(parts) + rng.choice([".", "?", "\n", ". "])


def build_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer)
    bos = tok.token_to_id("<s>")
    # Llama tokenizers prepend BOS when add_special_tokens=True (vLLM's /tokenize and prompts do).
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    return tok


def model_config(tok: Tokenizer, *, heads: int, layers: int, intermediate: int | None) -> dict[str, object]:
    hidden = HEAD_DIM * heads
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": tok.get_vocab_size(),
        "hidden_size": hidden,
        "intermediate_size": intermediate or 2 * hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": heads,
        "head_dim": HEAD_DIM,
        "hidden_act": "silu",
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "rope_scaling": None,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "bos_token_id": tok.token_to_id("<s>"),
        "eos_token_id": tok.token_to_id("</s>"),
        "pad_token_id": tok.token_to_id("<pad>"),
        "torch_dtype": "float32",
        "initializer_range": 0.02,
    }


def write_model(out: Path, *, heads: int = 2, layers: int = 2, intermediate: int | None = None) -> None:
    """Write the model directory `out` (created if missing; existing files are replaced)."""
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer()
    tok.save(str(out / "tokenizer.json"))
    config = model_config(tok, heads=heads, layers=layers, intermediate=intermediate)
    specials = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **specials,
        "model_max_length": 4096,
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }
    generation = {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"]}
    for name, obj in (
        ("config.json", config),
        ("generation_config.json", generation),
        ("tokenizer_config.json", tokenizer_config),
        ("special_tokens_map.json", specials),
    ):
        (out / name).write_text(json.dumps(obj, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="model directory to write")
    parser.add_argument("--heads", type=int, default=2, help=f"attention heads of {HEAD_DIM}")
    parser.add_argument("--layers", type=int, default=2, help="decoder layers")
    parser.add_argument("--intermediate", type=int, help="MLP width (default: 2 x hidden)")
    args = parser.parse_args(argv)
    write_model(args.out, heads=args.heads, layers=args.layers, intermediate=args.intermediate)
    print(f"wrote {args.out}: {sorted(p.name for p in args.out.iterdir())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
