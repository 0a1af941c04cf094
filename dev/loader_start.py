#!/usr/bin/env python
"""How long the data loader takes to open a FineWeb-sized dataset, and what memory it takes:
N shards of 10^8 tokens each (default 100: 10B tokens, GPT-2 124M's reproduction), made as
sparse files (a header, then a hole: every token reads as 0), opened by gpt2_common's
DataLoader as train_gpt2.py opens them, then the first batch read (its shard's ids are
checked then, on first use).

    python dev/loader_start.py [--shards 100] [--tokens 100000000] [--dir DIR]

Prints the time to open, the time to the first batch, and the process's peak RSS before
and after. The files are removed at the end.
"""

import argparse
import os
import resource
import shutil
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import gpt2_common as common  # noqa: E402


def peak_rss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", type=int, default=100)
    ap.add_argument("--tokens", type=int, default=10 ** 8, help="tokens per shard")
    ap.add_argument("--dir", default=None, help="where to make the sparse shards (default: a temp dir)")
    ap.add_argument("-b", type=int, default=64)
    ap.add_argument("-t", type=int, default=1024)
    args = ap.parse_args()
    folder = tempfile.mkdtemp(prefix="shards_", dir=args.dir)
    try:
        header = np.zeros(common.HEADER_INTS, dtype="<i4")
        header[:3] = [common.TOKENS_MAGIC, common.TOKENS_VERSION, args.tokens]
        for i in range(args.shards):
            with open(os.path.join(folder, f"fineweb_train_{i + 1:06d}.bin"), "wb") as f:
                f.write(header.tobytes())
                f.truncate(common.HEADER_INTS * 4 + 2 * args.tokens)  # sparse: no blocks on disk
        rss0 = peak_rss_mib()
        t0 = time.perf_counter()
        loader = common.DataLoader(os.path.join(folder, "fineweb_train_*.bin"), args.b, args.t, 50257, shuffle=True,
                                   seed=1337)
        opened = time.perf_counter() - t0
        batches = loader.num_batches()
        t1 = time.perf_counter()
        loader.next_batch()
        first = time.perf_counter() - t1
        print(f"{args.shards} shards of {args.tokens:,} tokens ({args.shards * args.tokens / 1e9:.1f}B tokens, "
              f"{batches:,} batches of B={args.b} T={args.t}): opened in {opened:.3f} s, first batch (its shard's ids "
              f"checked) in {first:.3f} s; peak RSS {rss0:.0f} MiB before, {peak_rss_mib():.0f} MiB after")
    finally:
        shutil.rmtree(folder)


if __name__ == "__main__":
    main()
