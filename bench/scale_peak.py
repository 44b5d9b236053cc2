"""Where a compile's peak memory is: `rwkvc compile` in this process with a thread that samples the resident
set every 20 ms and keeps the main thread's stack at the highest sample.

    python bench/scale_peak.py MODEL.pth OUT_DIR [--preset int4 | --passes RECIPE] [--target cpu]

Prints the peak RSS (anonymous and file-backed parts) and the stack that held it.
"""
from __future__ import annotations

import argparse
import sys
import threading
import time
import traceback


def rss() -> tuple[int, int]:
    anon = file = 0
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            anon = int(line.split()[1]) * 1024
        elif line.startswith("RssFile:"):
            file = int(line.split()[1]) * 1024
    return anon, file


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("out")
    ap.add_argument("--preset")
    ap.add_argument("--passes")
    ap.add_argument("--target", default="cpu")
    a = ap.parse_args(argv)
    from rwkvc.pipeline import compile_checkpoint
    passes = a.passes
    if a.preset:
        from rwkvc.passes.presets import preset
        passes = preset(a.preset)
    main_id = threading.get_ident()
    peak = {"rss": 0, "anon": 0, "file": 0, "stack": []}
    done = threading.Event()

    def sample():
        while not done.is_set():
            an, fi = rss()
            if an + fi > peak["rss"]:
                frame = sys._current_frames().get(main_id)
                peak.update(rss=an + fi, anon=an, file=fi, stack=traceback.format_stack(frame) if frame else [])
            time.sleep(0.02)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    t0 = time.time()
    compile_checkpoint(a.model, a.out, target=a.target, passes=passes, force=True)
    done.set()
    th.join()
    print(f"compile {time.time() - t0:.1f} s, peak RSS {peak['rss'] / 1e9:.3f} GB "
          f"(anonymous {peak['anon'] / 1e9:.3f}, file-backed {peak['file'] / 1e9:.3f}) at:")
    print("".join(peak["stack"][-8:]))


if __name__ == "__main__":
    main()
