"""Decode against the memory-bandwidth limit: the weight bytes a decode step reads over the measured read
bandwidth, with the bandwidth measured right before and after each decode run (this kind of shared machine's
bandwidth moves by 2x within a minute, so a limit measured apart from the decode says little).

    python bench/decode_bandwidth.py ARTIFACT [--pairs 5] [--threads 2] [--tokens 128]

Each pair: bench/bandwidth.c (bench_spine.bandwidth_gbps, OMP_NUM_THREADS=--threads),
`rwkvc bench ARTIFACT --json` in its own process (decode tokens/s; its weight_bytes_resident is what a step
reads), bandwidth.c again. Prints one line a pair: the bandwidth either side, the decode rate, the bytes it
reads a second, and that over the mean of the two bandwidths (the share of the limit).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

from bench_spine import bandwidth_gbps   # bench/bandwidth.c, built once


def decode(art: str, threads: int, tokens: int) -> dict:
    out = subprocess.run([sys.executable, "-m", "rwkvc.cli", "bench", art, "--json", "--threads", str(threads),
                          "--tokens", str(tokens), "--prefill", "16", "--repeat", "3"],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("artifact")
    ap.add_argument("--pairs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=128)
    a = ap.parse_args()
    shares = []
    for i in range(a.pairs):
        before = bandwidth_gbps(a.threads)
        j = decode(a.artifact, a.threads, a.tokens)
        after = bandwidth_gbps(a.threads)
        gbs = j["decode_tokens_per_s"] * j["weight_bytes_resident"] / 1e9
        share = gbs / ((before + after) / 2)
        shares.append(share)
        print(f"pair {i + 1}: bandwidth {before:.1f} / {after:.1f} GB/s, decode {j['decode_tokens_per_s']:.1f} "
              f"tok/s x {j['weight_bytes_resident'] / 1e9:.3f} GB = {gbs:.1f} GB/s, {share:.0%} of the limit",
              flush=True)
    shares.sort()
    print(f"share of the limit: median {shares[len(shares) // 2]:.0%}, range {shares[0]:.0%}-{shares[-1]:.0%}")

if __name__ == "__main__":
    main()
