"""Helper of baselines_vs_surprise.sh: split, exec-stage specs, Surprise run, comparison."""
import json
import os
import random
import sys
import time


def split(work):
    rows = []
    with open(f"{work}/ml-100k.inter") as f:
        header = f.readline()
        assert header.startswith("user_id"), f"unexpected header {header!r}"
        for line in f:
            u, i, r, t = line.rstrip("\n").split("\t")
            rows.append((u, i, r, str(int(float(t)))))
    rng = random.Random(2024)
    rng.shuffle(rows)
    n = len(rows)
    parts = {"train": rows[: int(0.8 * n)], "valid": rows[int(0.8 * n): int(0.9 * n)], "test": rows[int(0.9 * n):]}
    for name, part in parts.items():
        with open(f"{work}/{name}.data", "w") as f:
            for r in part:
                f.write("\t".join(r) + "\n")
    print(f"MovieLens-100K: {n} ratings → " + ", ".join(f"{k} {len(v)}" for k, v in parts.items()))


def spec(work, kind, stage, config, inputs):
    out = f"{work}/out-{stage}"
    os.makedirs(out, exist_ok=True)
    s = {"kind": kind, "stage": stage, "config": config, "inputs": inputs,
         "out_dir": out, "work_dir": f"{work}/work-{stage}", "seed": 0, "device": "cpu"}
    with open(f"{work}/spec-{stage}.json", "w") as f:
        json.dump(s, f, indent=1)


def spec_ingest(work, name):
    spec(work, "ingest", f"ingest-{name}", {"format": "movielens", "reviews": f"{work}/{name}.data"}, {})


def spec_baselines(work):
    config = {
        "methods": ["global_mean", "bias", "mf"],
        # Surprise's defaults, one grid point each; fitted on train only.
        "bias": {"reg_user": [15.0], "reg_item": [10.0], "iterations": 10},
        "mf": {"factors": [100], "reg": [0.02], "lr": [0.005], "epochs": 20, "init_std": 0.1, "shuffle": True},
        "refit": "train",
        "scale_min": 1.0,
        "scale_max": 5.0,
        "bootstrap": 1000,
    }
    inputs = {s: [f"{work}/out-ingest-{s}/interactions.parquet"] for s in ["train", "valid", "test"]}
    spec(work, "baselines", "baselines", config, inputs)


def compare(work):
    from surprise import SVD, BaselineOnly, Dataset, Reader, accuracy

    reader = Reader(line_format="user item rating timestamp", sep="\t", rating_scale=(1, 5))
    train = Dataset.load_from_file(f"{work}/train.data", reader).build_full_trainset()
    test = [(u, i, float(r)) for u, i, r, _ in (l.rstrip("\n").split("\t") for l in open(f"{work}/test.data"))]
    res = {}
    for name, algo in [("bias", BaselineOnly(bsl_options={"method": "als", "reg_u": 15, "reg_i": 10, "n_epochs": 10}, verbose=False)),
                       ("mf", SVD(random_state=0))]:
        t0 = time.perf_counter()
        algo.fit(train)
        pred = algo.test(test)
        res[name] = (accuracy.rmse(pred, verbose=False), accuracy.mae(pred, verbose=False), time.perf_counter() - t0)
    m = json.load(open(f"{work}/out-baselines/metrics.json"))
    ours = {x["method"]: x for x in m["methods"]}
    print(f"{'method':<12} {'recflow RMSE':>12} {'surprise RMSE':>13} {'ratio':>7}   {'recflow MAE':>11} {'surprise MAE':>12}   surprise fit+test")
    print(f"{'global_mean':<12} {ours['global_mean']['rmse']:>12.4f} {'':>13} {'':>7}   {ours['global_mean']['mae']:>11.4f}")
    worst = 0.0
    for name, label in [("bias", "BaselineOnly"), ("mf", "SVD")]:
        r, a, secs = res[name]
        ratio = ours[name]["rmse"] / r
        worst = max(worst, abs(ratio - 1))
        print(f"{name + ' / ' + label:<12} {ours[name]['rmse']:>12.4f} {r:>13.4f} {ratio:>7.4f}   {ours[name]['mae']:>11.4f} {a:>12.4f}   {secs:.1f} s")
    print(f"largest RMSE difference: {100 * worst:.2f}% (goal ≤ 2%)")
    sys.exit(0 if worst <= 0.02 else 1)


if __name__ == "__main__":
    cmd, work = sys.argv[1], sys.argv[2]
    if cmd == "split":
        split(work)
    elif cmd == "spec-ingest":
        spec_ingest(work, sys.argv[3])
    elif cmd == "spec-baselines":
        spec_baselines(work)
    elif cmd == "compare":
        compare(work)
    else:
        raise SystemExit(f"unknown command {cmd}")
