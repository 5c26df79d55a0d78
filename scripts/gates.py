#!/usr/bin/env python3
"""Learning gates of the quickstart (issue 7), checked by scripts/e2e.sh.

Reads the pipeline's lock (per-stage metrics summaries) and the
`recflow show --json` table, prints every method's RMSE / MAE next to the
synthetic data's best achievable RMSE, then checks that learning works:

  1. SFT valid-answer rate on the test samples  >= 90 %  (eval_sft, greedy);
  2. GRPO mean sampled reward over its last 10 % of steps is above that of
     its first 10 % by >= 0.05, and frac_reward_zero_std < 1 (some groups
     carry signal);
  3. GRPO's test reward (mean over 4 sampled answers per prompt,
     eval_grpo_s4) is above SFT's (eval_sft_s4).

The goal the quickstart works toward (GRPO RMSE below SFT's, both below the
global mean) is reported, not gated. Exit 1 when a gate fails.
Usage: gates.py LOCK_JSON SHOW_JSON   (stdlib only)
"""
import json
import sys


def main() -> int:
    lock = json.load(open(sys.argv[1]))
    show = json.load(open(sys.argv[2]))
    m = {name: st.get("metrics", {}) for name, st in lock["stages"].items()}
    rows = {r["method"]: r for r in show["methods"]}

    def f(x, nd=3):
        return "—" if x is None else f"{x:.{nd}f}"

    print(f"{'method':<22} {'n':>4} {'RMSE':>7} {'MAE':>7} {'invalid':>8}")
    for r in show["methods"]:
        print(f"{r['method']:<22} {r['n']:>4} {f(r['rmse']):>7} {f(r['mae']):>7} {f(r['invalid_rate']):>8}")
    best = m.get("ingest", {}).get("synthetic_best_rmse")
    print(f"{'best achievable':<22} {'':>4} {f(best):>7}   (Bayes predictor on the synthetic model, all ratings)")

    failed = []

    def gate(ok, what):
        print(f"[{'pass' if ok else 'FAIL'}] {what}")
        if not ok:
            failed.append(what)

    sft = m["eval_sft"]
    valid = 1.0 - sft["invalid_rate"]
    gate(valid >= 0.90, f"SFT valid-answer rate on {sft['n']} test samples {valid:.1%} >= 90%")

    g = m["grpo"]
    first, last, zs = g.get("reward_first_decile"), g.get("reward_last_decile"), g.get("frac_reward_zero_std_mean")
    gate(
        first is not None and last is not None and last - first >= 0.05,
        f"GRPO reward, last 10% of steps {f(last)} vs first 10% {f(first)}: rise >= 0.05",
    )
    gate(zs is not None and zs < 1.0, f"GRPO frac_reward_zero_std (mean over steps) {f(zs)} < 1")

    s4, g4 = m["eval_sft_s4"], m["eval_grpo_s4"]
    gate(
        g4["reward_mean"] > s4["reward_mean"],
        f"GRPO test reward {f(g4['reward_mean'])} > SFT's {f(s4['reward_mean'])} "
        f"({g4['samples_per_prompt']} samples per prompt, {g4['n']} prompts)",
    )

    # The goal, reported: GRPO RMSE < SFT RMSE < global mean.
    gm = rows.get("global_mean", {}).get("rmse")
    rs, rg = rows.get("sft", {}).get("rmse"), rows.get("grpo", {}).get("rmse")
    if None not in (gm, rs, rg):
        print(
            f"goal (reported, not gated): GRPO RMSE {rg:.3f} < SFT {rs:.3f}: {'yes' if rg < rs else 'no'}; "
            f"both < global mean {gm:.3f}: {'yes' if max(rg, rs) < gm else 'no'}"
        )
    if failed:
        print(f"{len(failed)} learning gate(s) failed", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
