#!/usr/bin/env python3
"""Side-by-side timing of one secure-aggregation round: fedveil against Flower.

Runs Flower 1.42's SecAgg+ harness (not part of this repository; pass its path)
and `fedveil simulate --json` alternately, REPS times per shape, on the same
machine in the same run, and prints a Markdown table of medians and ratios.

    python3 benches/compare_flower.py \
        --flower-python /path/to/venv/bin/python \
        --harness /path/to/flwr_secagg_bench.py --reps 3

Flower's figure is the harness's TOTAL: the whole SecAggPlusWorkflow with the
clients' fit and quantisation, every message serialised to protobuf and back,
clients run one after another in one process. fedveil's is `round_s`: client
quantisation, the five protocol stages with every message through the wire
encoding (clients in parallel on the available cores), and decoding. Neither
includes making up the inputs or checking the result.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FEDVEIL = os.path.join(ROOT, "target", "release", "fedveil")

# name, clients, dim, Flower (num_shares, threshold, drop), fedveil args
SHAPES = [
    ("N=50, k=7, t=4", 50, 100_000, ("7", "4", 0),
     ["--neighbors", "7", "--threshold", "4"]),
    ("N=50, k=6, t=4 (neighbours as Flower's num_shares=7)", 50, 100_000, ("7", "4", 0),
     ["--neighbors", "6", "--threshold", "4"]),
    ("N=50, complete graph, t=25", 50, 100_000, ("1.0", "0.5", 0),
     ["--complete", "--threshold", "25"]),
    ("N=50, k=7, t=4, 5 drop before masked input", 50, 100_000, ("7", "4", 5),
     ["--neighbors", "7", "--threshold", "4", "--drop", "masked:5"]),
]


def flower(py, harness, n, d, shares, threshold, drop, rep):
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        subprocess.run(
            [py, harness, "--n", str(n), "--d", str(d), "--num-shares", shares,
             "--threshold", threshold, "--drop", str(drop), "--reps", "1", "--json", f.name],
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            cwd=tempfile.gettempdir())
        r = json.load(open(f.name))[0]
    return r["total_s"], r["max_abs_err"]


def fedveil(n, d, extra, rep):
    out = subprocess.run(
        [FEDVEIL, "simulate", "--clients", str(n), "--dim", str(d), "--seed", str(rep), "--json"] + extra,
        check=False, capture_output=True, text=True)
    r = json.loads(out.stdout)
    if not r["correct"]:
        sys.exit(f"fedveil round was not correct: {r['outcome']}")
    return r["round_s"], r


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--flower-python", required=True)
    ap.add_argument("--harness", required=True)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--only", nargs="*", help="substrings of shape names to run")
    a = ap.parse_args()
    subprocess.run(["cargo", "build", "--release", "--quiet"], check=True, cwd=ROOT)
    print(f"{os.cpu_count()} cores; {a.reps} alternating repetitions per shape\n")
    print("| shape (d = 100,000) | Flower 1.42 | fedveil | ratio | fedveil stages (s): quantize / advertise / share / masked / consistency / unmask |")
    print("|---|---|---|---|---|")
    for name, n, d, (shares, th, drop), extra in SHAPES:
        if a.only and not any(s in name for s in a.only):
            continue
        fl, fv, last = [], [], None
        for rep in range(a.reps):
            t, err = flower(a.flower_python, a.harness, n, d, shares, th, drop, rep)
            fl.append(t)
            t, last = fedveil(n, d, extra, rep)
            fv.append(t)
        f_med, v_med = statistics.median(fl), statistics.median(fv)
        stages = " / ".join(f"{s['wall_s']:.3f}" for s in last["stages"])
        print(f"| {name} | {f_med:.3f} s | {v_med * 1000:.1f} ms | **{f_med / v_med:.0f}x** | "
              f"{last['quantize_s']:.3f} / {stages} |", flush=True)


if __name__ == "__main__":
    main()
