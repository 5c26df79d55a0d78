#!/usr/bin/env bash
# CUDA generation throughput (bf16) on a random Qwen2-architecture model of
# Qwen2.5-0.5B's shape (~494M parameters, random weights), no HF download.
# Runs in well under 5 minutes on one GPU. Prints tokens/s for
#   16 prompts x 200 tokens x 256 new, and the GRPO shape 8 prompts x 8 samples x 256 new.
# usage: benches/llm_cuda.sh
# Env: WORKER (a pre-built recflow-worker; default: build target/release/recflow-worker
# after scripts/setup.sh), PYTHON (a python with torch + transformers; default the venv's).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
if [ -z "${WORKER:-}" ]; then
  source scripts/setup.sh
  WORKER=target/release/recflow-worker
  [ -x "$WORKER" ] || cargo build --release -p recflow-ml --bin recflow-worker
fi
PYTHON="${PYTHON:-.venv/bin/python3}"
"$WORKER" doctor
WORK=.bench/llm_cuda
mkdir -p "$WORK"
"$PYTHON" - "$WORK" <<'PY'
import json, os, sys, torch
from transformers import Qwen2Config, Qwen2ForCausalLM
from tokenizers import Tokenizer, models, pre_tokenizers, decoders
d = os.path.join(sys.argv[1], "qwen2-0.5b-random")
if not os.path.exists(os.path.join(d, "config.json")):
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                      num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                      rope_theta=1000000.0, tie_word_embeddings=True, eos_token_id=151645, pad_token_id=151643,
                      use_sliding_window=False)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        m = Qwen2ForCausalLM(cfg).to(torch.bfloat16)
    m.save_pretrained(d, safe_serialization=True)
    tok = Tokenizer(models.BPE(vocab={chr(i + 33): i for i in range(94)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.save(os.path.join(d, "tokenizer.json"))
g = torch.Generator().manual_seed(1)
for name, n in [("batch", 16), ("grpo", 8)]:
    with open(os.path.join(sys.argv[1], f"prompts_{name}.json"), "w") as f:
        json.dump([torch.randint(100, 150000, (200,), generator=g).tolist() for _ in range(n)], f)
print(d)
PY
M="$WORK/qwen2-0.5b-random"
for shape in "batch 1" "grpo 8"; do
  set -- $shape
  echo "== $1: $("$PYTHON" -c "import json;print(len(json.load(open('$WORK/prompts_$1.json'))))") prompts x $2 samples x 256 new tokens, bf16, cuda"
  "$WORKER" model generate --model "$M" --prompts-file "$WORK/prompts_$1.json" --num-samples "$2" \
    --max-new-tokens 256 --min-new-tokens 256 --temperature 1 --device cuda --dtype bf16 \
    --max-batch-rows 128 --timing >/dev/null
done
# Where a decode step's time goes (device-synchronised phase split; slower,
# so a separate pass): prefill, forward, sampling, bookkeeping per step.
echo "== phase split, batch shape (RECFLOW_GEN_PROFILE=1)"
RECFLOW_GEN_PROFILE=1 "$WORKER" model generate --model "$M" --prompts-file "$WORK/prompts_batch.json" --num-samples 1 \
  --max-new-tokens 64 --min-new-tokens 64 --temperature 1 --device cuda --dtype bf16 --max-batch-rows 128 \
  --timing 2>&1 >/dev/null | grep '^{'
