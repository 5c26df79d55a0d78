#!/usr/bin/env bash
# Step-time cost of the numerics-profile options (docs/engine.md "Numerics profile"), side by side
# in one run: the quickstart's tiny Llama (hidden 128, 3 layers) SFT and GRPO steps, and with
# BENCH_SMOLLM2=1 SmolLM2-135M's SFT step, each under
#   aten=native | avx2 | default   (with mkl=compatible), and
#   mkl=off | auto | compatible    (with aten=avx2),
# plus whether the outputs' bytes differ between the options.
# usage: benches/numerics_cost.sh [SFT_STEPS] [GRPO_STEPS]   (default 12 and 4; medians reported)
# Env: RECFLOW / RECFLOW_WORKER pick the binaries (default target/debug, built by cargo build),
#      NUMERICS_THREADS (default 2), PROFILES="..." overrides the list of profiles.
# A project of its own under target/bench-numerics (own recflow.toml, store and lock): the
# quickstart's data stages run once, then sft and grpo run again under each profile (--force).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
SFT_STEPS=${1:-12}
GRPO_STEPS=${2:-4}
T=${NUMERICS_THREADS:-2}
RECFLOW=${RECFLOW:-$ROOT/target/debug/recflow}
export RECFLOW_WORKER=${RECFLOW_WORKER:-$ROOT/target/debug/recflow-worker}
PY=${PY:-$ROOT/.venv/bin/python3}
W=$ROOT/target/bench-numerics
mkdir -p "$W/pipelines"
touch "$W/recflow.toml"
PROFILES=${PROFILES:-"aten=native,mkl=compatible aten=avx2,mkl=compatible aten=default,mkl=compatible aten=avx2,mkl=off aten=avx2,mkl=auto"}

# The quickstart up to GRPO, with few steps and no evaluations inside the timed stages.
"$PY" - "$ROOT" "$W/pipelines/bench.yaml" "$SFT_STEPS" "$GRPO_STEPS" "${BENCH_SMOLLM2:-0}" <<'PY'
import sys, yaml
root, out, sft_steps, grpo_steps, smol = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5] == "1"
q = yaml.safe_load(open(f"{root}/pipelines/quickstart.yaml"))
keep = ["ingest", "filter", "split", "prompts", "teacher", "model_init", "sft", "grpo"]
st = {k: q["stages"][k] for k in keep}
st["prompts"]["with"]["template"] = f"{root}/stages/think_before_rec.md"
st["sft"]["with"].update(max_steps=sft_steps, eval_steps=10**6)
st["grpo"]["with"].update(max_steps=grpo_steps, eval_steps=10**6)
if smol:
    s = dict(st["sft"]); s["inputs"] = dict(s["inputs"], model=f"{root}/target/bench-numerics/smollm2")
    s["with"] = dict(s["with"], max_steps=max(2, sft_steps // 4), per_device_train_batch_size=4, learning_rate=1e-5)
    st["sft_smollm2"] = s
yaml.safe_dump({"name": "bench_numerics", "params": q["params"], "stages": st}, open(out, "w"), sort_keys=False)
PY
if [ "${BENCH_SMOLLM2:-0}" = 1 ] && [ ! -f "$W/smollm2/config.json" ]; then
  "$RECFLOW_WORKER" model import models/SmolLM2-135M-Instruct.Q4_1.gguf "$W/smollm2"
fi
P=$W/pipelines/bench.yaml
TIMED="sft grpo"
[ "${BENCH_SMOLLM2:-0}" = 1 ] && TIMED="$TIMED sft_smollm2"
FORCE=(); for s in $TIMED; do FORCE+=(--force "$s"); done
printf '%-34s' profile; for s in $TIMED; do printf '%14s' "$s s/step"; done; printf '  %s\n' "output ids (model, log) per stage"
for prof in $PROFILES; do
  RECFLOW_NUMERICS="$prof,threads=$T" "$RECFLOW" run "$P" -q "${FORCE[@]}" >/dev/null
  printf '%-34s' "$prof,threads=$T"
  "$PY" - "$W" "$P" $TIMED <<'PY'
import json, sys
w, p, stages = sys.argv[1], sys.argv[2], sys.argv[3:]
lock = json.load(open(p.replace(".yaml", ".lock")))
ids = []
for s in stages:
    e = lock["stages"][s]
    rec = json.load(open(f"{w}/cache/records/{e['key']}.json"))
    print(f"{rec['metrics']['step_s_median']:14.3f}", end="")
    ids.append(f"{s}:{e['outputs']['model']['id'][7:15]}/{e['outputs']['log']['id'][7:15]}")
n = lock["stages"][stages[0]].get("numerics", {})
print(f"  {' '.join(ids)}  [in force: aten={n.get('aten')} mkl={n.get('mkl')}]")
PY
done
