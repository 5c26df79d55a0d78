"""Reference data for ml/tests/llm.rs (SmolLM2 tests): the SmolLM2 GGUF loaded by
transformers (dequantized by the `gguf` package), and the chat template as
transformers renders it.

usage: smollm_ref.py GGUF_FILE CONVERTED_DIR OUT_JSON
CONVERTED_DIR is our `model import` output; its tokenizer files are loaded
with AutoTokenizer so chat rendering is compared on the same template.
"""
import json
import os
import sys

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))

TEXTS = [
    "The capital of France is",
    "Recommender systems predict how a user will rate an item: 4.5 out of 5 stars!",
]
CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You rate music."}, {"role": "user", "content": "Rate <this> album & explain."},
     {"role": "assistant", "content": "<rate>4</rate>"}, {"role": "user", "content": "Why?"}],
]


def main(gguf_file, conv_dir, out):
    tok = AutoTokenizer.from_pretrained(conv_dir)
    chats = []
    for msgs in CHATS:
        for agp in (True, False):
            chats.append({"messages": msgs, "add_generation_prompt": agp,
                          "text": tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=agp)})
    # transformers' own GGUF path (gguf-py dequantization + Q/K un-permutation),
    # called directly: from_pretrained(gguf_file=...) would also need `accelerate`.
    parsed = load_gguf_checkpoint(gguf_file, return_tensors=False)
    config = AutoConfig.for_model(**parsed["config"])
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tensors = load_gguf_checkpoint(gguf_file, return_tensors=True, model_to_load=model)["tensors"]
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    assert not unexpected and all("lm_head" in m for m in missing), (missing, unexpected)
    model.tie_weights()
    model.eval()
    texts = []
    for t in TEXTS:
        ids = tok(t).input_ids
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits.float()
        lp = torch.log_softmax(logits[0, :-1], -1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]
        texts.append({"text": t, "ids": ids, "logprobs": lp.tolist()})
    ids = torch.tensor([texts[0]["ids"]])
    with torch.no_grad():
        gen = model.generate(ids, max_new_tokens=6, do_sample=False, attention_mask=torch.ones_like(ids))
    cont = gen[0, ids.shape[1]:].tolist()
    with open(out, "w") as f:
        json.dump({"texts": texts, "chats": chats, "greedy_ids": cont, "greedy_text": tok.decode(cont)}, f)
    print("greedy:", repr(tok.decode(cont)))


if __name__ == "__main__":
    main(*sys.argv[1:4])
