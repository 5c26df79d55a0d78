#!/usr/bin/env python3
"""Ingest benchmark: recflow's `ingest` stage vs polars on the same Amazon-format JSON lines.

Builds Amazon review JSON lines of the requested sizes by repeating the real records of
../shared/data (Musical Instruments 2014 + Fashion 2018) with fresh user and item ids,
then, on the same file, in the same run:
  * recflow: the torch-free worker runs the `ingest` stage (exec-stage protocol) →
    interactions.parquet (six columns, snappy) + items.parquet + report.json;
  * polars: read_ndjson → the same six columns and types → write_parquet(snappy).
Wall and CPU time (median of --repeat runs) and peak RSS (/usr/bin/time -v) for both, the
throughput ratios recflow / polars (wall and CPU), after checking that both wrote the same rows.
Called by ingest_vs_polars.sh (which pins polars in .bench/venv).
"""
import argparse
import gzip
import json
import os
import re
import statistics
import subprocess
import sys
import time

SOURCES = [
    "amazon_musical_instruments/reviews_Musical_Instruments_5.partial.json.gz",
    "amazon_fashion/AMAZON_FASHION_5.json.gz",
]

POLARS = r"""
import sys, polars as pl
src, dst = sys.argv[1], sys.argv[2]
schema = {"reviewerID": pl.Utf8, "asin": pl.Utf8, "overall": pl.Float64, "unixReviewTime": pl.Int64,
          "summary": pl.Utf8, "reviewText": pl.Utf8}
df = pl.read_ndjson(src, schema=schema)
df = df.select(
    pl.col("reviewerID").alias("user_id"), pl.col("asin").alias("item_id"),
    pl.col("overall").cast(pl.Float32).alias("rating"), pl.col("unixReviewTime").alias("timestamp"),
    pl.col("summary").alias("review_title"), pl.col("reviewText").alias("review_text"))
df.write_parquet(dst, compression="snappy")
print(df.height)
"""

# Same rows from both tools? recflow stores blank texts as null (pinned
# schema: text is nullable, blank = missing); polars keeps "". Compared after
# mapping blanks to null, so a fast but wrong ingest cannot pass.
SAME = r"""
import sys, polars as pl
a, b = pl.read_parquet(sys.argv[1]), pl.read_parquet(sys.argv[2])
blank = [pl.when(pl.col(c).str.strip_chars() == "").then(None).otherwise(pl.col(c)).alias(c)
         for c in ("review_title", "review_text")]
b = b.with_columns(blank)
bad = [c for c in a.columns if not a[c].equals(b[c])]
print("same rows" if not bad else f"columns differ: {bad}")
sys.exit(1 if bad else 0)
"""


def build(path, size_bytes, data_dir):
    """Repeats the real records with fresh ids until the file holds size_bytes."""
    if os.path.exists(path) and os.path.getsize(path) >= size_bytes:
        return
    templates = []
    for s in SOURCES:
        with gzip.open(os.path.join(data_dir, s), "rt") as f:
            for line in f:
                r = json.loads(line)
                r["reviewerID"], r["asin"] = "\x00U\x00", "\x00A\x00"
                t = json.dumps(r)
                templates.append(t.replace("\\u0000U\\u0000", "{u}").replace("\\u0000A\\u0000", "{a}"))
    ids = [json.loads(line) for s in SOURCES for line in gzip.open(os.path.join(data_dir, s), "rt")]
    # Fashion lists product variants as repeated user-item pairs; give each
    # repeat its own item id so both tools keep every record (no dedup pass).
    seen, fresh = {}, []
    for r in ids:
        key = (r["reviewerID"], r["asin"])
        v = seen.get(key, 0)
        seen[key] = v + 1
        fresh.append((r["reviewerID"], r["asin"] + (f"v{v}" if v else "")))
    ids = fresh
    parts = [t.split("{u}") for t in templates]
    written, rep = 0, 0
    tmp = path + ".tmp"
    with open(tmp, "w", buffering=1 << 22) as f:
        while written < size_bytes:
            for (u, a), (pre, post) in zip(ids, parts):
                line = pre + f"{u}-{rep}" + post.replace("{a}", f"{a}-{rep}") + "\n"
                f.write(line)
                written += len(line)
                if written >= size_bytes:
                    break
            rep += 1
    os.replace(tmp, path)


def timed(cmd):
    """Runs cmd under /usr/bin/time -v; returns (seconds, peak RSS MiB, stdout)."""
    t0 = time.perf_counter()
    p = subprocess.run(["/usr/bin/time", "-v"] + cmd, capture_output=True, text=True)
    dt = time.perf_counter() - t0
    if p.returncode != 0:
        sys.exit(f"command failed ({p.returncode}): {' '.join(cmd)}\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}")
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr)
    cpu = sum(float(x) for x in re.findall(r"(?:User|System) time \(seconds\): ([\d.]+)", p.stderr))
    return dt, (int(m.group(1)) / 1024 if m else float("nan")), p.stdout, cpu


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--work", required=True)
    ap.add_argument("--sizes", default="0.5", help="comma-separated GB (10^9 bytes)")
    ap.add_argument("--repeat", type=int, default=1)
    a = ap.parse_args()
    os.makedirs(a.work, exist_ok=True)
    rows = []
    for gb in [float(x) for x in a.sizes.split(",")]:
        src = os.path.join(a.work, f"amazon_{gb}GB.json")
        print(f"building {src} …", flush=True)
        build(src, int(gb * 1e9), a.data)
        size = os.path.getsize(src)
        res = {"recflow": [], "polars": []}
        for _ in range(a.repeat):
            out = os.path.join(a.work, f"recflow_{gb}")
            spec = {"kind": "ingest", "stage": "ingest", "config": {"format": "amazon2014", "reviews": os.path.abspath(src)},
                    "inputs": {}, "out_dir": os.path.abspath(out), "work_dir": os.path.abspath(out + ".work"),
                    "seed": 0, "device": "cpu"}
            spec_path = os.path.join(a.work, "spec.json")
            with open(spec_path, "w") as f:
                json.dump(spec, f)
            dt, rss, _, cpu = timed([a.worker, "exec-stage", spec_path])
            with open(os.path.join(out, "report.json")) as f:
                kept = json.load(f)["kept"]
            res["recflow"].append((dt, rss, kept, cpu))
            dst = os.path.join(a.work, f"polars_{gb}.parquet")
            dt, rss, outp, cpu = timed([sys.executable, "-c", POLARS, src, dst])
            res["polars"].append((dt, rss, int(outp.strip().splitlines()[-1]), cpu))
        same = subprocess.run([sys.executable, "-c", SAME, os.path.join(out, "interactions.parquet"), dst],
                              capture_output=True, text=True)
        if same.returncode != 0:
            sys.exit(f"{gb} GB: recflow and polars wrote different rows: {same.stdout}{same.stderr[-2000:]}")
        med = {k: (statistics.median(x[0] for x in v), max(x[1] for x in v), v[0][2], statistics.median(x[3] for x in v))
               for k, v in res.items()}
        assert med["recflow"][2] == med["polars"][2], f"row counts differ: {med}"
        for tool, (dt, rss, n, cpu) in med.items():
            rows.append((gb, size, tool, dt, size / dt / 1e6, rss, n, cpu))
        print(f"{gb} GB: recflow/polars throughput ratio = {med['polars'][0] / med['recflow'][0]:.2f} (wall), "
              f"{med['polars'][3] / med['recflow'][3]:.2f} (CPU time)", flush=True)
    print("\n| input | tool | rows | wall s (median) | MB/s (wall) | CPU s (user+sys) | peak RSS MiB |")
    print("|---|---|---|---|---|---|---|")
    for gb, size, tool, dt, mbs, rss, n, cpu in rows:
        print(f"| {size / 1e9:.2f} GB | {tool} | {n:,} | {dt:.2f} | {mbs:.0f} | {cpu:.2f} | {rss:.0f} |")


if __name__ == "__main__":
    main()
