#!/usr/bin/env python3
"""Covey against its peers, side by side: each row runs Covey and the peer alternately,
three times each (by default), and prints medians and the ratio, with the load average
the figures were taken at.

Rows:
  tiny      LoRA training, tiny Llama (h256, 4 layers, byte vocab), batch 8 x 128, r8 q,v,
            against PyTorch + PEFT
  smollm2   LoRA training of SmolLM2-135M, batch 4 x 128, r8 q,v, against PyTorch + PEFT;
            Covey on the int8 release a coordinator publishes by default
  smollm2-dp  the same with example-level DP-SGD (per-example clipping, noise) against
            Covey without it: the ratio is the DP step time over the plain one
  decode-int8, decode-int4
            SmolLM2-135M decode (64 tokens) and prompt processing (128 tokens), Covey's
            int8 / int4 engine against llama.cpp's Q8_0 / Q4_1 (llama-bench), once per
            thread count of --decode-threads (rows decode-int8-t1, decode-int8-t2, ...)

  python3 bench/peers/run.py --python /path/to/torch-venv/bin/python [--rows tiny,smollm2]
        [--gguf models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf] [--repeats 3] [--threads 2]
  python3 bench/peers/run.py --rows decode-int8,decode-int4 [--llama DIR] [--decode-threads 1,2]

Set-up (once): see bench/peers/README.md.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def load():
    return open("/proc/loadavg").read().split()[0]


def covey_binary():
    subprocess.run(["cargo", "build", "-q", "-p", "covey-model-cli"], cwd=ROOT, check=True)
    target = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))
    return os.path.join(target, "debug", "covey-model")


def json_line(cmd):
    out = subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True).stdout
    return json.loads([line for line in out.splitlines() if line.startswith("{")][-1])


def llama_bench(binary, gguf, threads):
    """llama-bench's decode (tg64) and prompt (pp128) tokens/s, one repetition."""
    env = dict(os.environ, LD_LIBRARY_PATH=os.path.dirname(binary))
    out = subprocess.run([binary, "-m", gguf, "-t", str(threads), "-p", "128", "-n", "64", "-r", "1", "-o", "json"],
                         check=True, capture_output=True, text=True, env=env).stdout
    tests = json.loads(out)
    speed = {("decode" if t["n_gen"] else "prompt"): t["avg_ts"] for t in tests}
    return {"tokens_per_second": speed["decode"], "prompt_tokens_per_second": speed["prompt"]}


def covey_decode(covey, gguf, precision, threads):
    r = json_line([covey, "--threads", str(threads), "bench-infer", "--json", "--model", gguf,
                   "--precision", precision, "--decode-tokens", "64", "--prompt-tokens", "128", "--repeat", "1"])
    row = r["inference"][0]
    return {"tokens_per_second": row["decode_tokens_per_s"], "prompt_tokens_per_second": row["prompt_tokens_per_s"]}


def decode_rows(a, covey):
    """The decode rows: each side alternately, --repeats times, per thread count."""
    binary = os.path.join(a.llama, "build", "bin", "llama-bench")
    if not os.path.exists(binary):
        raise SystemExit(f"{binary} not found: run bench/peers/build-llamacpp.sh")
    peers = {"int8": os.path.join(a.llama, "SmolLM2-135M-Instruct.Q8_0.gguf"), "int4": a.gguf}
    results = {}
    for row in [r for r in a.rows.split(",") if r.startswith("decode-")]:
        precision = row.split("-")[1]
        if precision not in peers:
            raise SystemExit(f"unknown row {row}: decode-int8 or decode-int4")
        if not os.path.exists(peers[precision]):
            raise SystemExit(f"{peers[precision]} not found: run bench/peers/build-llamacpp.sh")
        for threads in [int(t) for t in a.decode_threads.split(",")]:
            runs = {"covey": [], "peer": []}
            loads = [load()]
            for i in range(a.repeats):
                for side in ("covey", "peer"):
                    r = (covey_decode(covey, a.gguf, precision, threads) if side == "covey"
                         else llama_bench(binary, peers[precision], threads))
                    runs[side].append(r)
                    print(f"{row}-t{threads} #{i + 1} {side}: decode {r['tokens_per_second']:.1f} tokens/s, "
                          f"prompt {r['prompt_tokens_per_second']:.1f} (load {load()})", file=sys.stderr)
                loads.append(load())
            med = {s: statistics.median(r["tokens_per_second"] for r in runs[s]) for s in runs}
            prompt = {s: statistics.median(r["prompt_tokens_per_second"] for r in runs[s]) for s in runs}
            results[f"{row}-t{threads}"] = {"runs": runs, "median_tokens_per_second": med,
                                            "median_prompt_tokens_per_second": prompt,
                                            "ratio": med["covey"] / med["peer"],
                                            "prompt_ratio": prompt["covey"] / prompt["peer"], "load": loads}
    return results


def table(header, rows):
    """A Markdown table."""
    print("| " + " | ".join(header) + " |")
    print("| " + " | ".join("---" for _ in header) + " |")
    for r in rows:
        print("| " + " | ".join(r) + " |")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--python", help="Python of a venv with requirements-torch.txt (the training rows)")
    ap.add_argument("--llama", default=os.environ.get("COVEY_PEERS_LLAMA", "/tmp/covey-peers/llama"),
                    help="what build-llamacpp.sh made (the decode rows)")
    ap.add_argument("--decode-threads", default="1,2")
    ap.add_argument("--rows", default="tiny,smollm2,smollm2-dp,decode-int8,decode-int4")
    ap.add_argument("--gguf", default=os.path.join(ROOT, "models", "smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=os.path.join(ROOT, "runs", "bench", "peers.json"))
    a = ap.parse_args()
    covey = covey_binary()
    rows = [r for r in a.rows.split(",") if not r.startswith("decode-")]
    if rows and not a.python:
        raise SystemExit(f"rows {','.join(rows)} need --python (a venv with requirements-torch.txt)")
    release = os.path.join(ROOT, "runs", "bench", "smollm2-int8")
    if any(r.startswith("smollm2") for r in rows) and not os.path.exists(os.path.join(release, "model.safetensors")):
        if not os.path.exists(a.gguf):
            raise SystemExit(f"{a.gguf} not found: run scripts/fetch-smollm2.sh")
        subprocess.run([covey, "quantize", "--model", a.gguf, "--out", release, "--precision", "int8"],
                       cwd=ROOT, check=True)
    t = str(a.threads)
    smol = [covey, "bench", "--json", "--threads", t, "--steps", "4", "--warmup", "1", "--model", release,
            "--base", "int8", "--data", "data/shakespeare/hamlet_gut.txt"]
    commands = {
        "tiny": (
            # Every layer's activations kept: 17 MiB each, within the row's 150 MiB.
            [covey, "bench", "--json", "--threads", t, "--steps", "20", "--warmup", "2",
             "--activation-memory-mib", "128"],
            [a.python, os.path.join(HERE, "torch_lora.py"), "tiny", "--threads", t, "--steps", "20"],
        ),
        "smollm2-dp": (smol + ["--example-clip", "1.0", "--example-noise", "1.0"], smol),
        "smollm2": (
            smol,
            [a.python, os.path.join(HERE, "torch_lora.py"), "smollm2", "--gguf", a.gguf, "--threads", t,
             "--steps", "4", "--warmup", "1"],
        ),
    }
    results = {}
    for row in rows:
        ours, peer = commands[row]
        runs = {"covey": [], "peer": []}
        loads = [load()]
        for i in range(a.repeats):
            for side, cmd in (("covey", ours), ("peer", peer)):
                r = json_line(cmd)
                runs[side].append(r)
                print(f"{row} #{i + 1} {side}: {r['tokens_per_second']:.1f} tokens/s, "
                      f"peak RSS {r['peak_rss_mib']:.0f} MiB (load {load()})", file=sys.stderr)
            loads.append(load())
        med = {s: statistics.median(r["tokens_per_second"] for r in runs[s]) for s in runs}
        rss = {s: statistics.median(r["peak_rss_mib"] for r in runs[s]) for s in runs}
        # Peers: Covey's speed over the peer's. The DP row: the DP step time over the plain one.
        ratio = med["peer"] / med["covey"] if row.endswith("-dp") else med["covey"] / med["peer"]
        results[row] = {"runs": runs, "median_tokens_per_second": med, "median_peak_rss_mib": rss,
                        "ratio": ratio, "load": loads}
    decode = decode_rows(a, covey)
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    json.dump({**results, **decode}, open(a.out, "w"), indent=1)
    if results:
        table(["row", "Covey tokens/s", "peer tokens/s", "ratio", "Covey peak RSS", "peer peak RSS", "load"],
              [[row, f"{r['median_tokens_per_second']['covey']:.0f}", f"{r['median_tokens_per_second']['peer']:.0f}",
                f"{r['ratio']:.2f}x", f"{r['median_peak_rss_mib']['covey']:.0f} MiB",
                f"{r['median_peak_rss_mib']['peer']:.0f} MiB", f"{min(r['load'])}-{max(r['load'])}"]
               for row, r in results.items()])
        print(f"(medians of {a.repeats} alternated runs each; {a.threads} threads; the -dp row's peer is Covey "
              f"without DP and its ratio the DP step time over the plain one)")
    if decode:
        table(["row", "Covey decode", "llama.cpp decode", "ratio", "Covey prompt", "llama.cpp prompt", "ratio", "load"],
              [[row, f"{r['median_tokens_per_second']['covey']:.1f}", f"{r['median_tokens_per_second']['peer']:.1f}",
                f"{r['ratio']:.2f}x", f"{r['median_prompt_tokens_per_second']['covey']:.0f}",
                f"{r['median_prompt_tokens_per_second']['peer']:.0f}", f"{r['prompt_ratio']:.2f}x",
                f"{min(r['load'])}-{max(r['load'])}"]
               for row, r in decode.items()])
        print(f"(tokens/s, medians of {a.repeats} alternated runs each; decode 64 tokens, prompt 128; "
              f"llama.cpp: Q8_0 for int8, the shipped Q4_1 for int4)")
    print(f"written to {a.out}")


if __name__ == "__main__":
    main()
