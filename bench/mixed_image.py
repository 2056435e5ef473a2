#!/usr/bin/env python3
"""Writes the benchmarks' mixed raw image: 64 MiB stripes of random data, text-like data
and zeros (a hole), a third each, the text from a fixed seed.

Usage: bench/mixed_image.py SIZE_MIB OUT.raw
"""
import os
import random
import sys

size_mib, out_path = int(sys.argv[1]), sys.argv[2]
stripe = 64 << 20
rng = random.Random(42)
words = b"the quick brown fox jumps over the lazy dog 0123456789 lorem ipsum dolor sit amet".split()
with open(out_path, "wb") as f:
    f.truncate(size_mib << 20)
    for i in range((size_mib << 20) // stripe):
        kind = i % 3
        if kind == 2:
            continue  # zeros: a hole
        f.seek(i * stripe)
        if kind == 0:
            f.write(os.urandom(stripe))
        else:
            out = bytearray()
            while len(out) < stripe:
                out += b" ".join(rng.choice(words) for _ in range(12)) + b"\n"
            f.write(bytes(out[:stripe]))
