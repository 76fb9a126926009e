"""Fused LoRA and DoRA training kernels for linear layers: one autograd function that saves only what backward needs.

    LoRA (Hu et al., 2021, eq. 3):   h = W0·x + b + s·B·A·drop(x)
    DoRA (Liu et al., 2024, eq. 5):  h = (m / ||W0 + s·B·A||_row) ⊙ (W0·x + s·B·A·drop(x)) + b

Composed from modules (PEFT, and lorafit's reference path in ``layers.py``), each adapter pays for a full copy of
its dropped input and a float mask (both saved for backward), full-size temporaries for scaling and adding, and, for
DoRA, the full matrix W0 + s·B·A every step. Here, per layer and step:

* the dropout mask is a pure function of a 62-bit seed (``keep_bits``), drawn once per input in forward and saved as
  booleans (1 byte per value), or in the input's dtype when that is bfloat16/float16 (``mask_dtype``: 2 bytes per
  value, a faster multiply); over a frozen weight the dropped input x ⊙ keep is saved in place of x (backward
  needs x only through it); adapters that read the same tensor share both: q/k/v, gate/up;
* the scales s and 1/(1-p) multiply the rank-r intermediate (N, r), and s·B·(A·drop(x)) is accumulated into the
  base output in place (``addmm_``);
* DoRA's row norms come from the factorised form (``factored_dora_norm``) with ||W0_i||² computed once, and the base
  output W0·x is reused for the magnitude's gradient (m's gradient is Σ_n g ⊙ y / ||W||, with y recovered from the
  saved output) instead of a second matmul.

Dropout masks: ``dropout_seed`` draws the seed from torch's global CPU RNG, which ``torch.utils.checkpoint``
restores before recomputing, so a recomputed forward regenerates the same mask. Backward uses the saved mask:
drawing it again cost 1 byte per value less memory but 5% of a bfloat16 step. With ``SHARE_DROPOUT`` (default on,
env ``LORAFIT_SHARE_DROPOUT=0`` turns it off) adapters that read the *same tensor* (q/k/v, gate/up) use one mask,
computed once; PEFT draws one mask per adapter. The probability is rounded to a multiple of 2⁻¹⁶ (0.05 ->
0.0500031) and kept units are scaled by 1/(1-p) of that rounded p, so E[drop(x)] = x exactly. The reference path
draws its masks through the same functions, so both paths see identical masks.
"""

from __future__ import annotations

import contextlib
import math
import os
import weakref

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .devices import accumulation_dtype
from .tensors import dense, is_quantized, linear_dequantizes

SHARE_DROPOUT = os.environ.get("LORAFIT_SHARE_DROPOUT", "1") != "0"
# bfloat16 bases (and autocast to bfloat16): the adapter's products run in bfloat16 too, its master weights and
# gradients stay float32 (LORAFIT_BF16_COMPUTE=0: float32 adapter products, as the reference path)
BF16_COMPUTE = os.environ.get("LORAFIT_BF16_COMPUTE", "1") != "0"

_LEVELS = 1 << 16  # the mask compares 16-bit uniform integers with round(p·2¹⁶)
_CHUNK = 1 << 20  # mask elements drawn per call: 2 MB of random words at a time, not a full-size temporary


# --- dropout from a seed ------------------------------------------------------------------------------------

def quantised_p(p: float) -> float:
    """The dropout probability the masks realise: p rounded to a multiple of 2⁻¹⁶."""
    return round(p * _LEVELS) / _LEVELS


def keep_scale(p: float) -> float:
    """1 / (1 - p) for the realised p: the factor that keeps E[drop(x)] = x."""
    return 1.0 / (1.0 - quantised_p(p))


def _int64(v: int) -> int:
    """v modulo 2⁶⁴ as a signed int64 (torch's integer arithmetic wraps the same way)."""
    v &= (1 << 64) - 1
    return v - (1 << 64) if v >> 63 else v


# SplitMix64 (Steele, Lea & Flood, "Fast splittable pseudorandom number generators", OOPSLA 2014): word i of seed s is
# mix(s + (i+1)·γ), a counter hash that vectorizes; torch's generators are serial (mt19937: 2.7 ns per 64-bit word)
_GAMMA, _MIX1, _MIX2 = _int64(0x9E3779B97F4A7C15), _int64(0xBF58476D1CE4E5B9), _int64(0x94D049BB133111EB)
_WORDS = 1 << 16  # 64-bit words per chunk (4 mask elements each): 512 KB buffers, robust to page faults
_counters: dict = {}  # device -> (_WORDS,) int64 constant (i+1)·γ
_ONE_BITS = {torch.bfloat16: 0x3F80, torch.float16: 0x3C00}  # 1.0's bits, as int16


def _xorshift_right(z: Tensor, k: int, tmp: Tensor) -> Tensor:
    """z ^= z >>> k (a logical shift: torch shifts int64 arithmetically, so the sign copies are masked off)."""
    torch.bitwise_right_shift(z, k, out=tmp)
    return z.bitwise_xor_(tmp.bitwise_and_((1 << (64 - k)) - 1))


def splitmix64(seed: int, start: int, z: Tensor, tmp: Tensor) -> Tensor:
    """Words start .. start+len(z)-1 of the SplitMix64 stream of ``seed``, written into z (int64; tmp: scratch)."""
    n = z.numel()
    counters = _counters.get(z.device)
    if counters is None:
        counters = _counters[z.device] = torch.arange(1, _WORDS + 1, dtype=torch.int64, device=z.device).mul_(_GAMMA)
    torch.add(counters[:n], _int64(seed + start * _GAMMA), out=z)  # s + (i+1)·γ for i = start ..
    _xorshift_right(z, 30, tmp).mul_(_MIX1)
    _xorshift_right(z, 27, tmp).mul_(_MIX2)
    return _xorshift_right(z, 31, tmp)


def keep_bits(seed: int, shape: tuple[int, ...], p: float, device: torch.device, *,
              dtype: torch.dtype = torch.bool) -> Tensor:
    """Bernoulli(1 - p) mask of ``shape``: a pure function of (seed, shape, p), as booleans (True kept) or, with a
    16-bit float ``dtype``, as its 1.0 and 0.0 (``mask_dtype``).

    16 random bits per element, four per 64-bit SplitMix64 word (``splitmix64``: 11 vectorized integer ops per chunk
    of 2¹⁶ words, where torch's mt19937 ``random_`` is serial and ``bernoulli_`` slower still); a 16-bit integer r is
    kept iff r >= round(p·2¹⁶) - 2¹⁵, compared into int16 and narrowed into the mask's bytes, because a compare
    straight into bool is about 10x slower (timings: docs/performance.md). A 16-bit float mask is the compare's
    0/1 times the bit pattern of 1.0, written into the mask's int16 view. The same integer arithmetic on every CPU
    kernel, so the same mask; off the CPU (``SPLITMIX_DEVICES``) one Bernoulli kernel of the device's generator
    draws it instead (``_device_keep_bits``), so masks differ between device types.
    """
    if torch.device(device).type not in SPLITMIX_DEVICES:
        return _device_keep_bits(seed, shape, p, torch.device(device), dtype)
    n = math.prod(shape)
    keep = torch.empty(shape, dtype=dtype, device=device)
    if dtype == torch.bool:
        flat, one = keep.view(-1).view(torch.uint8), 1  # the mask's bytes: 0 or 1
    else:
        flat, one = keep.view(-1).view(torch.int16), _ONE_BITS[dtype]
    words = (n + 3) // 4
    z = torch.empty(min(words, _WORDS), dtype=torch.int64, device=device)
    tmp = torch.empty_like(z)
    t = round(p * _LEVELS) - _LEVELS // 2  # dropped iff r < t, so P(dropped) = quantised_p(p)
    for w in range(0, words, _WORDS):
        m = min(_WORDS, words - w)
        r = splitmix64(seed, w, z[:m], tmp[:m]).view(torch.int16)  # uniform integers r on [-2¹⁵, 2¹⁵)
        k = min(4 * m, n - 4 * w)
        c = tmp[:m].view(torch.int16)[:k]  # r >= t as 0/1 in int16 (5 µs per 2¹⁸, against 45-65 µs into bool) ...
        torch.ge(r[:k], t, out=c)
        if one == 1:
            flat[4 * w:4 * w + k].copy_(c)  # ... narrowed to the mask's bytes (4 µs)
        else:
            torch.mul(c, one, out=flat[4 * w:4 * w + k])  # ... or made 0.0 / 1.0 (11 µs)
    return keep


SPLITMIX_DEVICES = ("cpu", "meta")  # where masks come from the SplitMix64 chunk loop; elsewhere one device kernel
_generators: dict = {}  # device -> a generator of that device, re-seeded for every mask


def _device_keep_bits(seed: int, shape: tuple[int, ...], p: float, device: torch.device,
                      dtype: torch.dtype) -> Tensor:
    """``keep_bits`` on an accelerator: one Bernoulli kernel from the device's own generator, seeded with ``seed``
    (host-side, no sync), so the mask is still a pure function of (seed, shape, p) on that device, and a resumed
    run (whose seeds come from the checkpointed CPU generator) draws the same masks. A chunked integer loop would be
    one launch per 2¹⁶ words on a GPU; the masks differ from the CPU's."""
    g = _generators.get(device)
    if g is None:
        g = _generators[device] = torch.Generator(device=device)
    g.manual_seed(seed)
    return torch.empty(shape, dtype=dtype, device=device).bernoulli_(1.0 - quantised_p(p), generator=g)


def mask_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the saved mask for inputs of ``dtype``: their own for bfloat16/float16, whose multiply with a
    uint8 mask first converts the mask to a full-size temporary (1024 x 1024 bfloat16: 0.22 ms against 0.12 ms with a
    bfloat16 mask), and bool (1 byte per value) otherwise."""
    return dtype if dtype in _ONE_BITS else torch.bool


def keep_mask(seed: int, shape: tuple[int, ...], p: float, device: torch.device) -> Tensor:
    """``keep_bits`` as a float32 mask (1.0 kept, 0.0 dropped)."""
    return keep_bits(seed, shape, p, device).to(torch.float32)


def apply_keep(x: Tensor, keep: Tensor, *, out: Tensor | None = None) -> Tensor:
    """x ⊙ keep, in x's dtype (``out=x``: in place): a multiply by a mask of x's dtype, or by a boolean mask's bytes
    viewed as uint8.

    Measured on an EPYC (1024 x 1024, 2 threads): 0.15 ms in bfloat16 and 0.11 ms in float32 with a boolean mask,
    against 0.63 ms for ``torch.where(keep, x, 0)`` (not vectorized) and 0.81 ms for a multiply by the boolean tensor
    itself (which converts it on the fly); a bfloat16 mask saves the uint8 mask's conversion (``mask_dtype``).
    Dropped entries are x·0, as in ``nn.Dropout`` (a NaN or inf input gives NaN there).
    """
    if keep.dtype == torch.bool:
        keep = keep.view(torch.uint8)
    elif keep.dtype != x.dtype:  # a float mask of another dtype (0 and 1 are exact in every one)
        keep = keep.to(x.dtype)
    return torch.mul(x, keep, out=out)


def dropout(x: Tensor, seed: int, p: float) -> Tensor:
    """drop(x) = x ⊙ keep / (1 - p), with the mask of ``keep_bits``."""
    return apply_keep(x, keep_bits(seed, tuple(x.shape), p, x.device, dtype=mask_dtype(x.dtype))).mul_(keep_scale(p))


_last_seed: dict = {"ref": None, "version": -1, "p": -1.0, "seed": 0}


def dropout_seed(x: Tensor, p: float) -> int:
    """The seed of x's dropout mask: one draw from torch's global CPU RNG, or, with SHARE_DROPOUT, the seed already
    given to this very tensor (same object, unmodified) by the previous call."""
    last = _last_seed
    if SHARE_DROPOUT and last["ref"] is not None and last["ref"]() is x and last["version"] == x._version \
            and last["p"] == p:
        return last["seed"]
    seed = int(torch.randint(0, 1 << 62, ()))
    last.update(ref=weakref.ref(x), version=x._version, p=p, seed=seed)
    _shared["fwd"].close()  # a new input: an open entry is another tensor's, even if its seed is equal (manual_seed)
    return seed


class SeededDropout(nn.Dropout):
    """nn.Dropout whose mask comes from ``dropout_seed``/``keep_bits``: the reference path's dropout, drawing exactly
    the masks the fused path draws. ``source`` is the tensor the layer received (the seed is keyed on it). Not traced
    by torch.compile (``layers.compile_boundaries``)."""

    def forward(self, x: Tensor, source: Tensor | None = None) -> Tensor:
        if not self.training or self.p == 0:
            return x
        return dropout(x, dropout_seed(x if source is None else source, self.p), self.p)


class _SharedInput:
    """The dropped input (x ⊙ keep, unscaled) and mask of one seed, kept for the adapters that read the same input and
    released after the last of them (backward keeps only what they did not save: DoRA's dropped input).

    The adapter that creates an entry (q, gate) learns from the previous step how many adapters follow it on the same
    input (k and v, up), so the entry is dropped right after its last reader; kept longer, the entry of the forward's
    last layer would add a full-size tensor to the peak memory at the start of backward. A wrong count only costs a
    recomputation: the mask is a function of the seed.
    """

    def __init__(self) -> None:
        self.entry: list | None = None  # [key, owner, value, uses, left]
        self.followers: dict[tuple, int] = {}  # owner -> readers after it, learned
        self.closed: tuple | None = None  # (key, owner) of the entry last released

    def get(self, key: tuple, owner: tuple, compute):
        e = self.entry
        if e is not None and e[0] == key:
            e[3] += 1
            e[4] -= 1
            if e[4] <= 0:
                self.close()
            return e[2]
        self.close()
        if self.closed is not None and self.closed[0] == key:  # a reader after the entry was released: learn it
            self.followers[self.closed[1]] = self.followers.get(self.closed[1], 0) + 1
            self.closed = None
        value = compute()
        left = self.followers.get(owner, 1) if SHARE_DROPOUT else 0
        if left > 0:
            self.entry = [key, owner, value, 0, left]
        else:
            self.closed = (key, owner)
        return value

    def close(self) -> None:
        if self.entry is not None:
            key, owner, _, uses, _ = self.entry
            self.followers[owner] = uses
            self.closed, self.entry = (key, owner), None


_shared = {"fwd": _SharedInput(), "bwd": _SharedInput()}


def _dropped(x2: Tensor, seed: int, p: float, phase: str, owner: int,
             keep: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(x2 ⊙ keep, keep) for ``seed``, shared by the adapters reading x2; backward passes forward's saved mask."""
    _shared["bwd" if phase == "fwd" else "fwd"].close()

    def compute():
        mask = keep_bits(seed, tuple(x2.shape), p, x2.device, dtype=mask_dtype(x2.dtype)) if keep is None else keep
        return apply_keep(x2, mask), mask

    shape = tuple(x2.shape)  # plain ints: comparing torch.Size is slower
    return _shared[phase].get((seed, x2.dtype, shape, x2.device), (owner, shape), compute)


def clear_cache() -> None:
    """Release the shared dropped inputs (the next pass releases them anyway)."""
    for cache in _shared.values():
        cache.close()


# --- DoRA norm --------------------------------------------------------------------------------------------

@torch.no_grad()
def row_sq_norms(W0: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """||W0_i||² per output row (out,): computed once per W0, which is frozen, and accumulated in float64, or in
    float32 where the device has no float64 (Apple's MPS). A float32 sum of ``in`` squares errs by at most
    ~in·2⁻²⁴ relative (2.4e-4 at in = 4096); measured on the CPU over 4096-wide rows (Gaussian, bfloat16 and
    Student-t weights): 1e-6 with torch's float32 vector_norm, 8e-6 summed one term at a time."""
    return torch.linalg.vector_norm(dense(W0), dim=1, dtype=accumulation_dtype(W0.device)).square().to(dtype)


@torch.no_grad()
def factored_dora_norm(W0: Tensor, A: Tensor, B: Tensor, s: float, w0_sq: Tensor) -> Tensor:
    """||W0 + s·B·A|| per output row (out,), in A's dtype, detached (DoRA §4.3), without forming the (out, in) matrix.

        ||W0_i + s(BA)_i||² = ||W0_i||² + 2s·(B ⊙ (W0·Aᵀ))_i·1 + s²·((B·(A·Aᵀ)) ⊙ B)_i·1

    Costs one (out, in) x (in, r) product instead of an (out, r) x (r, in) product plus the elementwise norm. A
    bfloat16 W0 with float32 factors (``BF16_COMPUTE``) takes that product in bfloat16 with float32 accumulation, not
    a float32 copy of W0 each step: W0·Aᵀ only enters the cross term, and rounds its ~2⁻⁹ into a norm that
    ||W0_i||² dominates (measured: 2e-7 relative with A, B ~ 0.01, 2e-5 with 0.05; bfloat16's eps is 4e-3).
    """
    if W0.dtype == A.dtype:
        WA = F.linear(W0, A)  # (out, in) @ (in, r) -> (out, r)
    elif BF16_COMPUTE and W0.dtype == torch.bfloat16:
        WA = F.linear(W0, A.to(W0.dtype)).to(A.dtype)
    else:
        WA = F.linear(W0.to(A.dtype), A)
    M = torch.addmm(WA, B, A @ A.t(), beta=2 * s, alpha=s * s)  # (out, r): 2s·W0·Aᵀ + s²·B·A·Aᵀ
    return torch.linalg.vecdot(B, M, dim=1).add_(w0_sq).clamp_min_(0).sqrt_()  # (out,)


# --- the autograd function ------------------------------------------------------------------------------------

class LoraLinearFunction(torch.autograd.Function):
    """The LoRA (``magnitude`` None) or DoRA linear layer; ``norm`` is DoRA's detached ||W0 + s·B·A||_row.

    Saves the rank-r intermediate A·(x ⊙ keep) (N, r), x (with dropout over a frozen weight: x ⊙ keep in its place),
    the dropout mask and, for DoRA, the output (which the next op often saves anyway: v, gate, up);
    adapters reading one input save the same tensors. The output must not be modified in place before backward
    (autograd reports it if it is).
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, A: Tensor, B: Tensor,
                magnitude: Tensor | None, norm: Tensor | None, s: float, p: float, seed: int,
                transposed: bool, W0: Tensor | None = None) -> Tensor:
        W = (weight.t() if transposed else weight) if W0 is None else W0  # (out, in); W0: DoRA's dequantized copy
        x2 = x.reshape(-1, x.shape[-1])  # (N, in)
        dora = magnitude is not None
        out = F.linear(x2, W, None if dora else bias)  # (N, out), base dtype
        xa = x2 if x2.dtype == A.dtype else x2.to(A.dtype)
        xd, keep = _dropped(xa, seed, p, "fwd", id(weight)) if p else (xa, None)
        h = F.linear(xd, A)  # (N, in) -> (N, r), unscaled: A·x ⊙ keep
        scale = s * keep_scale(p) if p else s
        if dora:
            y = out if out.dtype == A.dtype else out.to(A.dtype)  # (N, out): W0·x + s·B·A·drop(x)
            y.addmm_(h, B.t(), alpha=scale).mul_(magnitude / norm)
            out = y if y.dtype == out.dtype else y.to(out.dtype)
            if bias is not None:  # DoRA rescales the weight, never the bias
                out.add_(bias)
        elif out.dtype == A.dtype:
            out.addmm_(h, B.t(), alpha=scale)  # (N, r) @ (r, out), into the base output
        else:
            out.add_(F.linear(h * scale, B).to(out.dtype))  # half base: the reference path's rounding
        out = out.view(*x.shape[:-1], out.shape[-1])
        # over a frozen weight backward reads x only as x ⊙ keep (DoRA: unless a magnitude is 0, whose rows need
        # W0·x again; checked on the CPU only, where it costs no device sync): save that instead, the same size when
        # xa is x2
        dropped_only = keep is not None and xa is x2 and not weight.requires_grad and not (
            dora and (x.device.type not in HOST_LOOKUP or bool((magnitude == 0).any())))
        ctx.save_for_backward(None if dropped_only else x, weight, bias, A, B, h, magnitude, norm,
                              out if dora else None, xd if dropped_only else None, keep)
        ctx.s, ctx.p, ctx.seed, ctx.transposed, ctx.x_shape = s, p, seed, transposed, x.shape
        return out

    @staticmethod
    def backward(ctx, g: Tensor):
        x, weight, bias, A, B, h, magnitude, norm, out, xd, keep = ctx.saved_tensors
        need_x, need_w, need_b, need_A, need_B, need_m = ctx.needs_input_grad[:6]
        s, p = ctx.s, ctx.p
        scale = s * keep_scale(p) if p else s  # s/(1-p): applied to rank-r tensors only
        W = weight.t() if ctx.transposed else weight  # (out, in)
        if need_x and is_quantized(W):
            W = dense(W)  # this layer's values only, freed when backward leaves the layer
        g2 = g.reshape(-1, g.shape[-1])  # (N, out)
        grad_x = grad_w = grad_b = grad_A = grad_B = grad_m = None
        if need_b:
            grad_b = g2.sum(0)
        ga = g2 if g2.dtype == A.dtype else g2.to(A.dtype)  # (N, out), in the adapter's dtype
        if magnitude is not None:
            if need_m:
                grad_m = _magnitude_grad(ga, out.view(g2.shape), x, W, bias, B, h, scale, magnitude, norm)
            ga = ga * (magnitude / norm)  # gradient of y = W0·x + s·B·A·drop(x)
            gw = ga if ga.dtype == W.dtype else ga.to(W.dtype)  # the same, in the base dtype
        else:
            gw = g2
        if need_B:
            grad_B = (h.t() @ ga).t().mul_(scale)  # (r, N) @ (N, out) -> (out, r): 2x faster than ga.t() @ h
        if need_A or need_x:
            gh = (ga @ B).mul_(scale)  # (N, out) @ (out, r) -> (N, r)
            if xd is None:
                x2 = x.reshape(-1, x.shape[-1])
                xa = x2 if x2.dtype == A.dtype else x2.to(A.dtype)
                xd = _dropped(xa, ctx.seed, p, "bwd", id(weight), keep)[0] if p else xa
            if need_A:
                grad_A = gh.t() @ xd  # (r, N) @ (N, in) -> (r, in)
            del xd
            if need_x:
                t = gh @ A  # (N, r) @ (r, in) -> (N, in)
                if keep is not None:
                    t = apply_keep(t, keep, out=t)  # (N, in), in place
                if t.dtype == W.dtype:
                    grad_x = t.addmm_(gw, W)  # (N, out) @ (out, in), accumulated in place
                else:
                    grad_x = (gw @ W).add_(t.to(W.dtype))
                grad_x = grad_x.view(ctx.x_shape)
        if need_w:
            grad_w = gw.t() @ x.reshape(-1, x.shape[-1])  # (out, N) @ (N, in) -> (out, in)
            grad_w = grad_w.t() if ctx.transposed else grad_w
        return grad_x, grad_w, grad_b, grad_A, grad_B, grad_m, None, None, None, None, None, None


ZERO_ROWS = 8  # DoRA rows with m = 0 that backward recomputes on an accelerator (``_magnitude_grad``)
HOST_LOOKUP = ("cpu",)  # device types where DoRA reads whether a magnitude is 0: a host read costs nothing there


def _magnitude_grad(g: Tensor, out: Tensor, x: Tensor, W: Tensor, bias: Tensor | None, B: Tensor, h: Tensor,
                    scale: float, magnitude: Tensor, norm: Tensor) -> Tensor:
    """∂L/∂m = Σ_n g ⊙ y / ||W||, with y / ||W|| = (out - b) / m read off the saved output.

    Rows with m = 0 (e.g. a pruned, all-zero row of W0, whose magnitude starts at 0) were scaled to zero, so their y
    is recomputed (a (N, k) slice of the forward). On the CPU the zero rows are looked up; elsewhere, where a lookup
    would make the host wait for the device, the first ``ZERO_ROWS`` of them are taken at a static size (their slice
    costs an (N, in) x (in, ZERO_ROWS) product, under 1% of a layer's), and any beyond give a non-finite gradient,
    which stops the run (``train.steps``).
    """
    y = out if bias is None else out - bias  # (N, out): (m / ||W||) ⊙ y
    grad = torch.linalg.vecdot(g, y if y.dtype == g.dtype else y.to(g.dtype), dim=0).div_(magnitude)  # (out,)
    zero = magnitude == 0
    if g.device.type in HOST_LOOKUP:
        if not zero.any():  # a host read, free on the CPU
            return grad
        rows = zero.nonzero().squeeze(1)  # (k,)
    else:
        rows = torch.nonzero_static(zero, size=min(ZERO_ROWS, zero.numel()), fill_value=zero.numel()).squeeze(1)
    x2 = x.reshape(-1, x.shape[-1])
    take = rows.clamp_max(zero.numel() - 1)  # the fill value points past the end: any real row, then dropped
    y_rows = F.linear(x2, dense(W).index_select(0, take)).to(h.dtype).addmm_(h, B.index_select(0, take).t(),
                                                                            alpha=scale)  # (N, k)
    fixed = torch.linalg.vecdot(g.index_select(1, take), y_rows, dim=0) / norm.index_select(0, take)  # (k,)
    padded = torch.cat([grad, grad.new_zeros(1)])  # (out + 1,): the fill rows write into the extra slot
    return padded.index_copy_(0, rows, fixed.to(grad.dtype))[:-1]


def lora_linear(x: Tensor, weight: Tensor, bias: Tensor | None, *, A: Tensor, B: Tensor, s: float, p: float,
                transposed: bool = False, magnitude: Tensor | None = None, w0_sq: Tensor | None = None) -> Tensor:
    """The fused LoRA/DoRA linear layer ``W0·x + b + s·B·A·drop(x)`` (DoRA: scaled by m/||W0 + s·B·A||_c; see the
    module docstring). Not traceable by torch.compile: call it from a ``torch.compiler.disable``d function (as
    ``LoraLayer`` does).

    Args:
        x: (..., in) input.
        weight: (out, in) frozen base weight, or (in, out) when ``transposed`` (transformers Conv1D).
        bias: (out,) base bias or None.
        A: (r, in) and B: (out, r), the adapter factors.
        s: the scale alpha/r (or alpha/sqrt(r)).
        p: the dropout in effect (0 in eval mode).
        magnitude: (out,) DoRA's magnitude m, or None for LoRA.
        w0_sq: DoRA only: ``row_sq_norms(W0, A.dtype)``, the (out,) squared row norms of W0.

    A quantized ``weight`` (``lorafit.quant``: torchao NF4/int8) is used through ``F.linear``'s dispatch in forward
    and dequantized for this layer alone in backward (the input gradient) and for DoRA's norm.

    Under ``torch.autocast`` x, the weight and the bias are cast to the autocast dtype once and the layer runs with
    autocast off. A bfloat16 base with float32 factors computes the adapter's products in bfloat16 (``BF16_COMPUTE``):
    A, B (and DoRA's m and norm, the norm itself computed in float32) are cast by differentiable casts, so the float32
    master weights get their gradients cast back. Rounding: a few bfloat16 ulps of each product.
    """
    seed = dropout_seed(x, p) if p > 0 else 0  # keyed on the tensor the layer received (shared by q/k/v)
    device = x.device.type
    autocast = torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device)  # meta has none
    with torch.autocast(device, enabled=False) if autocast else contextlib.nullcontext():
        if autocast:  # what autocast would do to the base matmul, done once
            dt = torch.get_autocast_dtype(device)
            if is_quantized(weight):  # a quantized weight computes in its own dtype, and stays quantized
                dt = weight.dtype
            else:
                weight = weight.to(dt)
            x, bias = x.to(dt), None if bias is None else bias.to(dt)
        norm = W0 = None
        if magnitude is not None:  # a quantized W0 is dequantized for the norm (one layer at a time)
            W0 = dense(weight.t() if transposed else weight)  # (out, in)
            norm = factored_dora_norm(W0, A, B, s, w0_sq)  # (out,), in A's dtype
            W0 = W0 if linear_dequantizes(weight) else None  # NF4: forward reuses the dequantized copy
        return _apply(x, weight, bias, A, B, magnitude, norm, s, p, seed, transposed, W0)


def _apply(x, weight, bias, A, B, magnitude, norm, s, p, seed, transposed, W0=None):
    if BF16_COMPUTE and weight.dtype == torch.bfloat16 and A.dtype == torch.float32:
        # differentiable casts: backward brings the bfloat16 gradients back to the float32 master weights
        A, B = A.to(torch.bfloat16), B.to(torch.bfloat16)
        if magnitude is not None:
            magnitude, norm = magnitude.to(torch.bfloat16), norm.to(torch.bfloat16)
    return LoraLinearFunction.apply(x, weight, bias, A, B, magnitude, norm, s, p, seed, transposed, W0)
