#!/usr/bin/env python3
"""Apply a Covey adapter GGUF to a base GGUF in llama.cpp (llama-cpp-python) and compare
its next-token choices with Covey's merged model.

Input: the JSON `tests/tests/llamacpp_lora.rs` writes (token ids per prompt and Covey's
top-1 id at every position). Output: one JSON object on stdout with the agreement.

    LLAMA_CPP_LIB_PATH=/tmp/perf-scout/llama-build/bin \\
      /tmp/perf-scout/llama-venv/bin/python scripts/llamacpp_lora_check.py \\
      --base BASE.gguf --lora ADAPTER.gguf --expected covey_top1.json

llama-cpp-python is built as in ../shared/bench/llamacpp/build.sh (PyPI sdist 0.3.36).
"""
import argparse
import json

import numpy as np
from llama_cpp import Llama


def top1(llm, tokens):
    llm.reset()
    llm.eval(tokens)
    scores = np.asarray(llm.scores[: len(tokens)])
    return [int(i) for i in scores.argmax(axis=1)]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--base", required=True)
    p.add_argument("--lora", required=True)
    p.add_argument("--expected", required=True)
    a = p.parse_args()
    want = json.load(open(a.expected))
    kw = dict(n_ctx=512, n_threads=2, logits_all=True, verbose=False)
    with_lora = Llama(model_path=a.base, lora_path=a.lora, **kw)
    base = Llama(model_path=a.base, **kw)
    same = total = same_base = bases_agree = 0
    for tokens, covey_top1, covey_base in zip(want["tokens"], want["covey_top1"], want["covey_base_top1"]):
        got = top1(with_lora, tokens)
        plain = top1(base, tokens)
        same += sum(int(x == y) for x, y in zip(got, covey_top1))
        same_base += sum(int(x == y) for x, y in zip(plain, covey_top1))
        bases_agree += sum(int(x == y) for x, y in zip(plain, covey_base))
        total += len(tokens)
    print(json.dumps({
        "base": a.base,
        "positions": total,
        # llama.cpp base + adapter vs Covey's merged model: the check.
        "top1_agreement_with_lora": same / total,
        # llama.cpp base alone vs Covey's merged model: how much the adapter changes.
        "top1_agreement_without_lora": same_base / total,
        # llama.cpp base alone vs Covey's base alone: the arithmetic of the base file.
        "top1_agreement_of_the_bases": bases_agree / total,
    }))


if __name__ == "__main__":
    main()
