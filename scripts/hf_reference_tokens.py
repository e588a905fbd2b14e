"""Reference token ids for SmolLM2-135M-Instruct from Hugging Face's own `tokenizers`.

The tokenizer is assembled exactly as SmolLM2's published `tokenizer.json` declares it
(byte-level BPE; pre-tokenizer Sequence[Digits(individual_digits=True),
ByteLevel(add_prefix_space=False, use_regex=True)]; no normalizer; ByteLevel decoder;
control tokens as special added tokens), from the vocabulary and merges that the GGUF
file carries (read with llama.cpp's `gguf` Python package). Covey's Rust importer must
produce the same ids; `model/tests/smollm2.rs` compares them.

    pip install gguf==0.17.1 tokenizers==0.23.3
    python3 scripts/hf_reference_tokens.py SmolLM2-135M-Instruct.Q4_1.gguf > model/tests/fixtures/smollm2_token_ids.json
"""
import json
import sys

from gguf import GGUFReader
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

PROMPTS = [
    "What is the capital of France?",
    "Hello, world! 12345 tokens cost $3.50 in 2024.",
    "  Shakespeare's  sonnet\n\tnumber 18:\nShall I compare thee to a summer's day?",
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
    "naïve café — “quotes” and emoji 🤗, tabs\t\tand CRLF\r\n",
    "def f(x):\n    return x**2  # square\n",
]


def field(reader, name):
    f = reader.fields[name]
    return [bytes(f.parts[i]).decode("utf-8") if f.types[-1].name == "STRING" else f.parts[i][0] for i in f.data]


def main(path):
    r = GGUFReader(path)
    tokens = field(r, "tokenizer.ggml.tokens")
    types = field(r, "tokenizer.ggml.token_type")
    merges = [tuple(m.split(" ", 1)) for m in field(r, "tokenizer.ggml.merges")]
    tok = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    )
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == 3])
    out = [{"text": p, "ids": tok.encode(p, add_special_tokens=False).ids} for p in PROMPTS]
    for o in out:
        assert tok.decode(o["ids"], skip_special_tokens=False) == o["text"], o
    json.dump({"generator": "scripts/hf_reference_tokens.py", "cases": out}, sys.stdout, ensure_ascii=False, indent=1)
    print()


if __name__ == "__main__":
    main(sys.argv[1])
