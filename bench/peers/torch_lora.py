#!/usr/bin/env python3
"""One PyTorch + PEFT LoRA training measurement, printed as one JSON line.

The peer Covey's training benchmark runs against (`bench/peers/run.py` alternates the two).
Mirrors `covey-model bench`: LoRA rank 8, alpha 16, on q_proj and v_proj, dropout 0, base
frozen, AdamW on the adapter only, next-token cross-entropy, random windows of
Shakespeare text (`data/shakespeare`), fp32, `torch.set_num_threads(--threads)`.

  tiny     LlamaConfig(hidden 256, intermediate 688, 4 layers, 4 heads, 4 KV heads,
           vocab 256, untied), random init, byte ids; batch 8 x 128
  smollm2  SmolLM2-135M-Instruct from its GGUF (dequantized to fp32 by transformers),
           its BPE ids; batch 4 x 128

Peak RSS is the whole process's (ru_maxrss: imports and model loading included) and the
training loop's (psutil, sampled every 20 ms).
"""
import argparse
import glob
import json
import os
import resource
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class PeakRSS:
    def __init__(self):
        import psutil
        self.p = psutil.Process()
        self.peak = 0
        self._stop = threading.Event()

    def __enter__(self):
        self.peak = self.p.memory_info().rss
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()
        return self

    def _run(self):
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self.p.memory_info().rss)

    def __exit__(self, *a):
        self._stop.set()
        self.t.join()
        self.peak = max(self.peak, self.p.memory_info().rss)


def corpus(max_chars):
    files = sorted(glob.glob(os.path.join(ROOT, "data", "shakespeare", "*_gut.txt")))
    if not files:
        raise SystemExit("data/shakespeare/*_gut.txt not found: run from a Covey checkout")
    out, n = [], 0
    for f in files:
        t = open(f, encoding="utf-8", errors="ignore").read()
        out.append(t)
        n += len(t)
        if n >= max_chars:
            break
    return "".join(out)[:max_chars]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("case", choices=["tiny", "smollm2"])
    ap.add_argument("--gguf", help="SmolLM2 GGUF file (smollm2 case)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--lr", type=float, default=1e-4)
    a = ap.parse_args()

    import torch
    torch.set_num_threads(a.threads)
    import peft
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    if a.case == "tiny":
        batch = 8
        cfg = LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                          num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                          tie_word_embeddings=False, rms_norm_eps=1e-5, attention_dropout=0.0)
        torch.manual_seed(0)
        model = LlamaForCausalLM(cfg)
        ids = torch.frombuffer(bytearray(corpus(2_000_000).encode("utf-8", errors="ignore")), dtype=torch.uint8).long()
    else:
        batch = 4
        if not a.gguf:
            raise SystemExit("--gguf is required for smollm2")
        from transformers import AutoModelForCausalLM, AutoTokenizer
        d, f = os.path.dirname(os.path.abspath(a.gguf)), os.path.basename(a.gguf)
        model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
        ids = torch.tensor(tok(corpus(400_000), add_special_tokens=False)["input_ids"], dtype=torch.long)
    model.config.use_cache = False
    lcfg = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, bias="none",
                      task_type="CAUSAL_LM")
    model = get_peft_model(model, lcfg)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    seq = 128

    def step():
        starts = torch.randint(0, ids.numel() - seq - 1, (batch,), generator=g).tolist()
        x = torch.stack([ids[s:s + seq] for s in starts])
        out = model(input_ids=x, labels=x)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(out.loss)

    for _ in range(a.warmup):
        step()
    with PeakRSS() as pr:
        t0 = time.perf_counter()
        for _ in range(a.steps):
            loss = step()
        secs = time.perf_counter() - t0
    print(json.dumps({
        "peer": f"pytorch {torch.__version__} + peft {peft.__version__}",
        "case": a.case, "threads": a.threads, "batch": batch, "seq": seq, "steps": a.steps,
        "tokens_per_second": a.steps * batch * seq / secs,
        "ms_per_step": secs * 1000 / a.steps,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_rss_mib_training_loop": pr.peak / 2**20,
        "loss_last": loss,
        "trainable": sum(p.numel() for p in params),
    }))


if __name__ == "__main__":
    main()
