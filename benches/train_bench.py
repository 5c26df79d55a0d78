"""Helpers of benches/train_vs_trl.sh (CPU): model/data preparation, the TRL
GRPOTrainer peer and the plain PyTorch SFT peer. Every step time printed is
a median over steps after the first (warm-up), in seconds.

usage:
  train_bench.py prepare WORK          # WORK/tiny_qwen2, WORK/smollm2, WORK/*.parquet
  train_bench.py cuda_model WORK       # WORK/qwen2_0p5b_random (random Qwen2-0.5B architecture)
  train_bench.py trl MODEL WORK STEPS [SAMPLES.parquet MAX_COMPLETION MAX_PROMPT]
                                       # TRL GRPOTrainer, B=4 prompts x G=4 x 64 tokens (or on real prompts)
  train_bench.py sft MODEL WORK STEPS  # plain PyTorch/transformers step, 16 x 320 tokens, full FT
"""
import json
import os
import re
import resource
import statistics
import sys
import time

import torch

torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GGUF = os.path.join(ROOT, "models", "SmolLM2-135M-Instruct.Q4_1.gguf")
B, G, COMPLETION, PROMPT = 4, 4, 64, 64
SFT_BATCH, SFT_LEN = 16, 320


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def prompts(n):
    return [f"User {i} listened to rock and jazz albums. Rate the album 'Blue {i}' from 1 to 5." for i in range(n)]


def write_parquet(path, rows, coldstart=False):
    import pyarrow as pa
    import pyarrow.parquet as pq
    msg = pa.struct([pa.field("role", pa.utf8(), False), pa.field("content", pa.utf8(), False)])
    fields = [
        pa.field("sample_id", pa.utf8(), False), pa.field("user_id", pa.utf8(), False),
        pa.field("item_id", pa.utf8(), False), pa.field("timestamp", pa.int64(), False),
        pa.field("messages", pa.list_(pa.field("item", msg, True)), False),
        pa.field("target", pa.float32(), False), pa.field("user_history_len", pa.int32(), False),
        pa.field("item_history_len", pa.int32(), False),
    ]
    n = len(rows)
    cols = [[f"s{i}" for i in range(n)], ["u"] * n, ["i"] * n, [0] * n,
            [[{"role": "user", "content": r[0]}] for r in rows], [4.0] * n, [0] * n, [0] * n]
    if coldstart:
        fields += [pa.field("completion", pa.utf8(), True), pa.field("accepted", pa.bool_(), False),
                   pa.field("reason", pa.utf8(), True), pa.field("attempts", pa.int32(), False),
                   pa.field("teacher", pa.utf8(), False), pa.field("reasoning_content", pa.utf8(), True)]
        cols += [[r[1] for r in rows], [True] * n, [None] * n, [1] * n, ["bench"] * n, [None] * n]
    schema = pa.schema(fields)
    pq.write_table(pa.Table.from_arrays([pa.array(c, type=f.type) for c, f in zip(cols, fields)], schema=schema), path)


def prepare(work):
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config, Qwen2ForCausalLM
    os.makedirs(work, exist_ok=True)
    smol = os.path.join(work, "smollm2")
    # benches/train_vs_trl.sh imports the GGUF with `recflow-worker model import` first.
    if os.path.isfile(os.path.join(smol, "tokenizer.json")):
        tok = AutoTokenizer.from_pretrained(smol)
    else:
        tok = AutoTokenizer.from_pretrained(os.path.dirname(GGUF), gguf_file=os.path.basename(GGUF))
    if not os.path.isdir(smol):
        m = AutoModelForCausalLM.from_pretrained(os.path.dirname(GGUF), gguf_file=os.path.basename(GGUF),
                                                 torch_dtype=torch.float32)
        m.save_pretrained(smol, safe_serialization=True)
        tok.save_pretrained(smol)
    tiny = os.path.join(work, "tiny_qwen2")
    if not os.path.isdir(tiny):
        torch.manual_seed(0)
        cfg = Qwen2Config(vocab_size=49152, hidden_size=128, intermediate_size=512, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                          tie_word_embeddings=True, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
        Qwen2ForCausalLM(cfg).save_pretrained(tiny, safe_serialization=True)
        tok.save_pretrained(tiny)
    write_parquet(os.path.join(work, "samples.parquet"), [(p, None) for p in prompts(64)])
    # SFT rows: prompt + completion that tokenize to about SFT_LEN tokens with the chat template.
    filler = " ".join(["the album has warm guitars and a slow groove"] * 40)
    rows = []
    for p in prompts(SFT_BATCH * 4):
        ids = tok(filler, add_special_tokens=False).input_ids[: SFT_LEN - 60]
        rows.append((p, tok.decode(ids) + " <rate>4</rate>"))
    write_parquet(os.path.join(work, "coldstart.parquet"), rows, coldstart=True)
    write_parquet(os.path.join(work, "valid.parquet"), [(p, None) for p in prompts(1)])


def cuda_model(work):
    """Random-weight Qwen2-0.5B-architecture model (benches/train_cuda.sh) + samples."""
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM
    os.makedirs(work, exist_ok=True)
    d = os.path.join(work, "qwen2_0p5b_random")
    if not os.path.isdir(d):
        # BENCH_TOKENIZER: a saved HF tokenizer dir (a GPU machine without models/).
        if os.environ.get("BENCH_TOKENIZER"):
            tok = AutoTokenizer.from_pretrained(os.environ["BENCH_TOKENIZER"])
        else:
            tok = AutoTokenizer.from_pretrained(os.path.dirname(GGUF), gguf_file=os.path.basename(GGUF))
        torch.manual_seed(0)
        cfg = Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                          num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                          tie_word_embeddings=True, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id,
                          torch_dtype="bfloat16")
        Qwen2ForCausalLM(cfg).to(torch.bfloat16).save_pretrained(d, safe_serialization=True)
        tok.save_pretrained(d)
    write_parquet(os.path.join(work, "samples.parquet"), [(p, None) for p in prompts(64)])
    write_parquet(os.path.join(work, "valid.parquet"), [(p, None) for p in prompts(4)])


def paper_reward(completions, target=None, **_):
    """RecZero's reward: valid -> 1 + (1 - |pred - y| / 2), else -1 (format check simplified: <rate>x</rate>).
    y is the sample's `target` column when the dataset has one (real prompts), else 4."""
    out = []
    for i, c in enumerate(completions):
        text = c if isinstance(c, str) else c[0]["content"]
        y = float(target[i]) if target is not None else 4.0
        m = re.search(r"<rate>\s*([0-9]+(?:\.[0-9]+)?)\s*</rate>", text)
        out.append(1.0 + (1.0 - abs(float(m.group(1)) - y) / 2.0) if m else -1.0)
    return out


class Timer:
    def __init__(self):
        self.t = []

    def callback(self):
        from transformers import TrainerCallback
        timer = self

        class CB(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                timer.start = time.perf_counter()

            def on_step_end(self, args, state, control, **kw):
                timer.t.append(time.perf_counter() - timer.start)
        return CB()


def trl(model_dir, work, steps, samples=None, completion=COMPLETION, prompt_len=PROMPT):
    """TRL GRPOTrainer on the bench prompts, or on a recflow samples Parquet
    (its `messages` as the conversation, its `target` for the reward)."""
    import trl as trl_mod
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer
    if samples:
        import pyarrow.parquet as pq
        rows = pq.read_table(samples).to_pylist()
        ds = Dataset.from_list([{"prompt": [{"role": m["role"], "content": m["content"]} for m in r["messages"]],
                                 "target": float(r["target"])} for r in rows])
    else:
        ds = Dataset.from_list([{"prompt": [{"role": "user", "content": p}]} for p in prompts(64)])
    args = GRPOConfig(output_dir=os.path.join(work, "trl_out"), per_device_train_batch_size=B * G, num_generations=G,
                      max_completion_length=completion, max_prompt_length=prompt_len, max_steps=steps, learning_rate=1e-6,
                      beta=0.0, loss_type="dapo", temperature=1.0, logging_steps=1, report_to=[], save_strategy="no",
                      use_cpu=True, bf16=False, gradient_accumulation_steps=1, seed=0, dataloader_num_workers=0)
    timer = Timer()
    # Time spent in HF generate (TRL's rollouts), to split its step like ours.
    import transformers.generation.utils as gen_utils
    gen_s = [0.0]
    orig_generate = gen_utils.GenerationMixin.generate

    def timed_generate(self, *a, **kw):
        t0 = time.perf_counter()
        try:
            return orig_generate(self, *a, **kw)
        finally:
            gen_s[0] += time.perf_counter() - t0
    gen_utils.GenerationMixin.generate = timed_generate
    # Llama/Qwen2 take no token_type_ids, but a tokenizer loaded from a bare
    # tokenizer.json returns them and generate() rejects them: name the inputs.
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(model_dir, model_input_names=["input_ids", "attention_mask"])
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    t = GRPOTrainer(model=model_dir, reward_funcs=paper_reward, args=args, train_dataset=ds,
                    processing_class=tok, callbacks=[timer.callback()])
    t.train()
    med = statistics.median(timer.t[1:] or timer.t)
    # Completion lengths differ when the model stops early: report them so
    # step times are compared at equal work (recflow's metrics say the same).
    lens = [h["completions/mean_length"] for h in t.state.log_history if "completions/mean_length" in h]
    zero_std = [h["frac_reward_zero_std"] for h in t.state.log_history if "frac_reward_zero_std" in h]
    print(json.dumps({"peer": f"trl {trl_mod.__version__}", "model": model_dir, "step_s_median": med,
                      "completion_mean_length": statistics.mean(lens) if lens else None,
                      "frac_reward_zero_std_mean": statistics.mean(zero_std) if zero_std else None,
                      "generation_s_per_step": gen_s[0] / max(1, steps),
                      "peak_rss_mb": peak_rss_mb()}))


def sft(model_dir, work, steps):
    from transformers import AutoModelForCausalLM
    m = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
    m.train()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-5)
    torch.manual_seed(0)
    ids = torch.randint(0, m.config.vocab_size, (SFT_BATCH, SFT_LEN))
    labels = ids.clone()
    labels[:, :40] = -100  # prompt tokens carry no loss, as in completion-only SFT
    ts, cpu = [], []
    for _ in range(steps):
        t0, c0 = time.perf_counter(), time.process_time()
        out = m(input_ids=ids, labels=labels)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        ts.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)  # user + system, all threads (as recflow's step_cpu_s_median)
    print(json.dumps({"peer": f"torch {torch.__version__}", "model": model_dir,
                      "step_s_median": statistics.median(ts[1:] or ts),
                      "step_cpu_s_median": statistics.median(cpu[1:] or cpu), "peak_rss_mb": peak_rss_mb()}))


if __name__ == "__main__":
    cmd = sys.argv[1]
    if cmd == "prepare":
        prepare(sys.argv[2])
    elif cmd == "cuda_model":
        cuda_model(sys.argv[2])
    elif cmd == "trl":
        if len(sys.argv) >= 8:  # the real-prompts row: SAMPLES_PARQUET MAX_COMPLETION MAX_PROMPT
            trl(sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5], int(sys.argv[6]), int(sys.argv[7]))
        else:
            trl(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    elif cmd == "sft":
        sft(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    else:
        sys.exit(__doc__)
