"""Would a compiled kernel pay for dropout? lorafit's eager mask (``fused.keep_bits`` then ``fused.apply_keep``)
against the same SplitMix64 arithmetic fused into one kernel by ``torch.compile`` (inductor's C++ code), side by
side in one process, on the random Llama's adapted inputs (1024 tokens x 1024 and x 2816, bfloat16).

    python benchmarks/compiled_mask.py --repeats 200
    GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736 python benchmarks/compiled_mask.py

The compiled kernel must give the same mask bit for bit (checked); the question is its speed and its cold compile
time, which a core that needs only torch would pay on a user's first step, with a C++ compiler on the machine.
Run it both ways: with glibc's default malloc every eager temporary (a few MB) is a fresh mmap and pays its page
faults, as in a plain process; with the heap retained (the second line, as ``step.py --retain-heap`` runs the
training step) only the arithmetic and the memory traffic remain.

2026-12-07, AMD EPYC, 2 threads: default malloc, compiled/eager 0.32 (1024x1024) and 0.25 (1024x2816); heap
retained, 0.50-1.05 and 0.81-0.95 over four runs (compiled 0.71-0.79 and 1.96-2.03 ms, eager 0.74-1.41 and
2.11-2.42); the first call compiled for 16-20 s (3.4 s from inductor's cache). Other CPU kernels: under
ATEN_CPU_CAPABILITY=avx2 the compiled mask was wrong (807,674 of 1M values differ, some NaN; ``keep_applied`` run
eagerly matches ``keep_bits``), and under ATEN_CPU_CAPABILITY=default inductor's C++ failed to compile ("'at::vec'
has not been declared").
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from lorafit import fused


def _srl(z: torch.Tensor, k: int) -> torch.Tensor:
    return (z >> k) & ((1 << (64 - k)) - 1)  # a logical shift of int64


def keep_applied(x: torch.Tensor, seed: int, t: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(x ⊙ keep, keep) with ``keep_bits``' mask: element e takes the 16-bit lane e % 4 of SplitMix64 word e // 4.

    Each element hashes its own word (4x the integer work of hashing each word once): inductor vectorizes this
    one-index form, and a (words, 4) broadcast of hashed words compiled to a kernel 2-3x slower than eager torch."""
    e = torch.arange(x.numel(), dtype=torch.int64)
    z = seed + ((e >> 2) + 1) * fused._GAMMA
    z = (z ^ _srl(z, 30)) * fused._MIX1
    z = (z ^ _srl(z, 27)) * fused._MIX2
    z = z ^ _srl(z, 31)
    r = (z >> ((e & 3) * 16)) & 0xFFFF  # unsigned 16-bit lane
    r = torch.where(r >= 1 << 15, r - (1 << 16), r)  # as keep_bits reads it: int16
    keep = (r >= t).to(x.dtype).view(x.shape)
    return x * keep, keep


def median_ms(f, repeats: int) -> float:
    for _ in range(3):
        f()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        f()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--p", type=float, default=0.05)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t = round(args.p * fused._LEVELS) - fused._LEVELS // 2  # keep_bits' threshold: dropped iff r < t
    t0 = time.perf_counter()
    compiled = torch.compile(keep_applied, dynamic=True)
    x = torch.randn(1024, 1024, dtype=torch.bfloat16)
    compiled(x, 1, t)
    print(f"# {time.strftime('%Y-%m-%d')}, torch {torch.__version__}, {args.threads} threads: torch.compile took "
          f"{time.perf_counter() - t0:.1f} s for the first call (inductor's on-disk cache may shorten it)")
    print("shape        eager ms  compiled ms  compiled/eager  same mask")
    for shape in ((1024, 1024), (1024, 2816)):
        x = torch.randn(shape, dtype=torch.bfloat16)
        seed = 0x1234_5678_9ABC
        want = fused.keep_bits(seed, shape, args.p, x.device, dtype=torch.bfloat16)
        got_x, got = compiled(x, seed, t)
        same = torch.equal(got, want) and torch.equal(got_x, fused.apply_keep(x, want))

        def eager():
            fused.apply_keep(x, fused.keep_bits(seed, shape, args.p, x.device, dtype=torch.bfloat16))

        e, c = median_ms(eager, args.repeats), median_ms(lambda: compiled(x, seed, t), args.repeats)
        print(f"{shape[0]}x{shape[1]:<7} {e:9.3f} {c:12.3f} {c / e:15.2f}  {same}")


if __name__ == "__main__":
    main()
