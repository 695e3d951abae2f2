"""What keying the CIFAR-10 decode cache by content costs: the content digest beside the stat listing it
replaced as the key, the cached load and the decode it saves, on the whole data set (both splits).

Not from the paper: the measurement behind :func:`hawqlib.repro.data._content_key`. In one process, for
``--reps`` repetitions, each variant in turn (order rotated):

- ``listing``: names, sizes and modification times of every source file (the old key; no file is read);
- ``content``: the new key on a process's first call: the listing, then the SHA-256 of every file's bytes;
- ``cached``: the listing, then reading and verifying the decoded cache (a hit under the old key; a hit
  under the new one is ``content`` plus ``cached`` less ``listing``; later calls in a process cost ``cached``);
- ``decode``: decoding every image again (what a hit saves; ``--decode 0`` leaves it out).

The first repetition reads the files from disk or the OS's page cache as it finds them; the figures are
medians, with the first repetition's content digest printed apart (a cold read when the files were not read
recently). The decode cache is built in a temporary folder (``HAWQ_CACHE``), never in the checkout's.

    HAWQ_DATA=/work/shared/datasets python benchmarks/cache_digest.py [--reps 5] [--decode 1]
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--decode", type=int, default=1, help="1: time the full decode too (about 10 s a split per core)")
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="hawq-cache-bench-")
    os.environ["HAWQ_CACHE"] = tmp
    os.environ.pop("FORCE", None)
    from hawqlib.repro import data as D

    layout, folder = D.find_cifar10(download=False)
    splits = ("train", "test")
    n = {s: len(D._sources(layout, folder, s)) for s in splits}
    print(f"source: {folder} ({layout}), {sum(n.values())} files; cache in {tmp}")
    t0 = time.perf_counter()
    for s in splits:
        D.cifar10(s)  # builds the cache (and reads every file once)
    print(f"first build (content key + decode + write), both splits: {time.perf_counter() - t0:.1f} s")

    def listing():
        for s in splits:
            D._listing(layout, folder, s)

    def content():
        D._CONTENT.clear()
        for s in splits:
            D._content_key(layout, folder, s)

    keys = {s: D._content_key(layout, folder, s) for s in splits}

    def cached():
        for s in splits:
            D._listing(layout, folder, s)
            assert D._load_cache(*D._cache_paths(keys[s], s), keys[s]) is not None

    def decode():
        decoder = D._decode_imagefolder if layout == "imagefolder" else D._decode_batches
        for s in splits:
            decoder(folder, s)

    variants = {"listing": listing, "content": content, "cached": cached}
    if args.decode:
        variants["decode"] = decode
    times = {k: [] for k in variants}
    names = list(variants)
    for r in range(args.reps):
        for k in names[r % len(names):] + names[:r % len(names)]:
            t = time.perf_counter()
            variants[k]()
            times[k].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{args.reps} repetitions, both splits ({sum(n.values())} files), median seconds:")
    for k, v in med.items():
        print(f"  {k:8s} {v:8.3f} s   (min {min(times[k]):.3f}, max {max(times[k]):.3f})")
    old_hit, new_hit = med["cached"], med["content"] + med["cached"] - med["listing"]
    print(f"a process's first cache hit: {old_hit:.2f} s keyed by the listing, {new_hit:.2f} s keyed by content "
          f"({new_hit / old_hit:.2f}x)" + (f"; decoding instead: {med['decode']:.2f} s ({med['decode'] / new_hit:.1f}x "
                                           "the content-keyed hit)" if "decode" in med else ""))
    for p in Path(tmp).iterdir():
        p.unlink()
    Path(tmp).rmdir()


if __name__ == "__main__":
    main()
