"""Reference data for ml/tests/llm_parity.rs: tiny random Llama and Qwen2
models saved by transformers as safetensors, plus their per-token logprobs.

usage: make_tiny.py OUT_DIR
Writes OUT_DIR/NAME/ (HF model dir) and OUT_DIR/NAME/reference.json:
{"input_ids": [[...]], "logprobs": [[...]]} with
logprobs[b][t] = log p(input_ids[b][t+1] | input_ids[b][:t+1]) in float32.
Deterministic (fixed seeds); runs in a few seconds on CPU.
"""
import json
import os
import sys

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))

COMMON = dict(vocab_size=97, intermediate_size=64, num_hidden_layers=2, max_position_embeddings=256,
              rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2, pad_token_id=0)

# name -> (family, config kwargs); GQA ratios 1, 2, 3; tied and untied.
CASES = {
    "llama_tied_gqa1": ("llama", dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=4,
                                      tie_word_embeddings=True, rope_theta=10000.0)),
    "llama_untied_gqa2": ("llama", dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                                        tie_word_embeddings=False, rope_theta=500000.0)),
    "llama_untied_gqa3_headdim": ("llama", dict(hidden_size=48, num_attention_heads=6, num_key_value_heads=2,
                                                head_dim=16, tie_word_embeddings=False, rope_theta=10000.0,
                                                attention_bias=True)),
    "qwen2_untied_gqa3": ("qwen2", dict(hidden_size=48, num_attention_heads=6, num_key_value_heads=2,
                                        tie_word_embeddings=False, rope_theta=1000000.0)),
    "qwen2_tied_gqa2": ("qwen2", dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                                      tie_word_embeddings=True, rope_theta=10000.0)),
    "qwen2_untied_gqa1": ("qwen2", dict(hidden_size=32, num_attention_heads=2, num_key_value_heads=2,
                                        tie_word_embeddings=False, rope_theta=10000.0)),
}


def main(out):
    for i, (name, (fam, kw)) in enumerate(sorted(CASES.items())):
        torch.manual_seed(1000 + i)
        if fam == "llama":
            cfg = LlamaConfig(**COMMON, **kw, initializer_range=0.2)
            model = LlamaForCausalLM(cfg)
        else:
            cfg = Qwen2Config(**COMMON, **kw, initializer_range=0.2, use_sliding_window=False)
            model = Qwen2ForCausalLM(cfg)
        model = model.float().eval()
        # HF initialises biases to 0 and norms to 1: randomise them so the
        # test sees them.
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n.endswith(".bias"):
                    p.normal_(0.0, 0.2)
                elif "norm" in n:
                    p.copy_(1.0 + 0.2 * torch.randn_like(p))
        d = os.path.join(out, name)
        model.save_pretrained(d, safe_serialization=True)
        g = torch.Generator().manual_seed(7 + i)
        ids = torch.randint(3, cfg.vocab_size, (3, 21), generator=g)
        with torch.no_grad():
            logits = model(input_ids=ids).logits.float()
        lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0]
        with open(os.path.join(d, "reference.json"), "w") as f:
            json.dump({"input_ids": ids.tolist(), "logprobs": lp.tolist()}, f)
    print("ok", len(CASES))


if __name__ == "__main__":
    main(sys.argv[1])
