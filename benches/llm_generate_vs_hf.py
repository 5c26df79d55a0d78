"""Generation throughput: recflow-worker vs HF transformers `generate`, same
weights, f32, CPU, same thread count, token counts forced equal
(min_new_tokens = max_new_tokens), sampling at temperature 1.

usage: llm_generate_vs_hf.py WORKER SMOLLM_DIR WORK_DIR [--threads N] [--quick]
Shapes (issue 3, item 8):
  batch: 16 distinct ~200-token prompts x 64 new tokens
  grpo : 4 prompts x 8 samples x 64 new tokens (HF: num_return_sequences=8)
on SmolLM2-135M (imported from the GGUF) and on a tiny random Llama.
Prints one line per case with both tokens/s and the ratio ours/HF.
"""
import argparse
import json
import os
import subprocess
import time

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

NEW = 64


def prompts_ids(vocab, n, base_len, seed):
    g = torch.Generator().manual_seed(seed)
    # Distinct prompts of ~base_len tokens (lengths vary by up to 10%, so
    # left padding is exercised); ids avoid the first 20 (special tokens).
    out = []
    for i in range(n):
        length = base_len - (i * 7) % max(1, base_len // 10)
        out.append(torch.randint(20, vocab, (length,), generator=g).tolist())
    return out


def hf_generate(model, prompts, g, pad_id):
    t = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), t), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, t - len(p):] = torch.tensor(p)
        mask[i, t - len(p):] = 1
    torch.manual_seed(0)
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                             max_new_tokens=NEW, min_new_tokens=NEW, num_return_sequences=g, pad_token_id=pad_id)
    secs = time.perf_counter() - t0
    n = (out.shape[1] - t) * out.shape[0]
    return n, secs


def ours_generate(worker, model_dir, prompts, g, threads, work):
    pf = os.path.join(work, "prompts.json")
    with open(pf, "w") as f:
        json.dump(prompts, f)
    cmd = [worker, "model", "generate", "--model", model_dir, "--prompts-file", pf, "--num-samples", str(g),
           "--max-new-tokens", str(NEW), "--min-new-tokens", str(NEW), "--temperature", "1", "--seed", "0",
           "--threads", str(threads), "--max-batch-rows", "64", "--timing"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"worker failed: {r.stderr}")
    timing = json.loads([l for l in r.stderr.splitlines() if l.startswith("{")][-1])
    return timing["generated_tokens"], timing["seconds"]


def tiny_model(work):
    d = os.path.join(work, "tiny")
    if not os.path.exists(os.path.join(d, "config.json")):
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                          tie_word_embeddings=True, eos_token_id=2, bos_token_id=1, pad_token_id=0)
        LlamaForCausalLM(cfg).save_pretrained(d, safe_serialization=True)
        # The worker needs a tokenizer dir; reuse a trivial byte-level one.
        from tokenizers import Tokenizer, models, pre_tokenizers, decoders
        tok = Tokenizer(models.BPE(vocab={chr(i + 33): i for i in range(94)}, merges=[]))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.save(os.path.join(d, "tokenizer.json"))
    return d


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("worker")
    ap.add_argument("smollm_dir")
    ap.add_argument("work")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    ap.add_argument("--quick", action="store_true", help="tiny model only")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    os.makedirs(a.work, exist_ok=True)
    models = [("tiny", tiny_model(a.work), 512)]
    if not a.quick:
        models.insert(0, ("smollm2-135m", a.smollm_dir, 49152))
    print(f"threads={a.threads} dtype=f32 new_tokens={NEW} (forced) sampling T=1")
    for name, d, vocab in models:
        hf = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
        for shape, n, base, g in [("16x200 prompts x64", 16, 200, 1), ("GRPO 4x8 x64", 4, 200, 8)]:
            prompts = prompts_ids(vocab, n, base, seed=1)
            on, osec = ours_generate(a.worker, d, prompts, g, a.threads, a.work)
            hn, hsec = hf_generate(hf, prompts, g, pad_id=0)
            assert on == hn, f"token counts differ: ours {on}, HF {hn}"
            print(f"{name:14s} {shape:20s} tokens={on:5d} recflow {on / osec:8.1f} tok/s ({osec:6.2f} s)  "
                  f"HF {hn / hsec:8.1f} tok/s ({hsec:6.2f} s)  ratio {hsec / osec:5.2f}x", flush=True)


if __name__ == "__main__":
    main()
