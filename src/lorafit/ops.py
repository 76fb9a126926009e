"""Pure LoRA math: delta weights, DoRA norms, merged weights and initialisations.

Every supported layer is viewed as a matrix ``W0`` of shape (out, in):

* ``linear``    nn.Linear            weight (out, in)             W0 = weight
* ``linear_t``  transformers Conv1D  weight (in, out)             W0 = weightᵀ        (GPT-2's fan_in_fan_out)
* ``embedding`` nn.Embedding         weight (num_emb, dim)        W0 = weightᵀ        (a linear map of one-hot ids)
* ``conv``      nn.Conv1d/2d         weight (out, in, *kernel)    W0 = weight.flatten(1)

and ``A`` (r, in), ``B`` (out, r) are stored in the layouts PEFT writes to disk (conv: A (r, in, *kernel),
B (out, r, 1, ...)). LoRA (Hu et al., 2021): ``W = W0 + s·B·A``. DoRA (Liu et al., 2024, eq. 5):
``W' = m ⊙ (W0 + s·B·A) / ||W0 + s·B·A||_row``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .errors import ConfigError
from .tensors import dense

KINDS = ("linear", "linear_t", "embedding", "conv")


def scaling(r: int, alpha: float, use_rslora: bool) -> float:
    """s = alpha / r (LoRA §4.1), or alpha / sqrt(r) for RSLoRA (Kalajdzievski 2023, eq. 3): the one scale rule,
    used by the layers (through targets), export, suggest and the adapter summary."""
    return alpha / (math.sqrt(r) if use_rslora else r)


def as_matrix(weight: Tensor, kind: str) -> Tensor:
    """View a layer's weight as W0 (out, in)."""
    if kind == "linear":
        return weight
    if kind in ("linear_t", "embedding"):
        return weight.t()
    return weight.flatten(1)  # conv: (out, in*k...)


def from_matrix(matrix: Tensor, kind: str, shape: torch.Size) -> Tensor:
    """Inverse of ``as_matrix``: a (out, in) matrix back to the layer's weight layout."""
    if kind == "linear":
        return matrix
    if kind in ("linear_t", "embedding"):
        return matrix.t()
    return matrix.reshape(shape)


def lora_product(A: Tensor, B: Tensor) -> Tensor:
    """B·A as an (out, in) matrix, for any of the stored layouts."""
    r = A.shape[0]
    return B.reshape(B.shape[0], r) @ A.reshape(r, -1)  # (out, r) @ (r, in) -> (out, in)


def delta_weight(A: Tensor, B: Tensor, s: float, kind: str, shape: torch.Size) -> Tensor:
    """ΔW = s·B·A in the layer's weight layout (LoRA eq. 3)."""
    return from_matrix(s * lora_product(A, B), kind, shape)


@torch.no_grad()
def dora_norm(W0: Tensor, A: Tensor, B: Tensor, s: float) -> Tensor:
    """||W0 + s·B·A|| per output row (out,), in float32, without gradient.

    DoRA §4.3 treats the norm as a constant in backward, which is what makes DoRA's memory cost close to LoRA's.
    """
    W = dense(W0).float() + s * lora_product(A.float(), B.float())  # (out, in)
    return torch.linalg.vector_norm(W, dim=1)  # (out,)


@torch.no_grad()
def merged_weight(weight: Tensor, kind: str, A: Tensor, B: Tensor, s: float,
                  magnitude: Tensor | None = None) -> Tensor:
    """The base weight with the adapter folded in, computed in float32 and cast back to weight's dtype.

    LoRA: W0 + s·B·A.  DoRA: m ⊙ (W0 + s·B·A) / ||W0 + s·B·A||_row.
    """
    W = as_matrix(dense(weight), kind).float() + s * lora_product(A.float(), B.float())  # (out, in)
    if magnitude is not None:
        W = W * (magnitude.float() / torch.linalg.vector_norm(W, dim=1)).unsqueeze(1)
    return from_matrix(W, kind, weight.shape).to(weight.dtype).contiguous()


# --- initialisation -----------------------------------------------------------------------------------------

@torch.no_grad()
def init_lora(A: Tensor, B: Tensor, kind: str, init, r: int) -> None:
    """Initialise A and B in place as PEFT does.

    True: A ~ kaiming-uniform(a=√5) (nn.Linear's default), B = 0, so ΔW = 0 at start (LoRA §4.1).
    "gaussian": A ~ N(0, 1/r²), B = 0.  False: both random (a non-zero ΔW; for tests).
    Embeddings swap the roles (A = 0, B ~ N(0, 1)), following loralib.
    """
    if kind == "embedding":
        if init is False:
            A.normal_()
        else:
            A.zero_()
        B.normal_()
        return
    if init == "gaussian":
        A.normal_(std=1.0 / r)
    else:
        nn.init.kaiming_uniform_(A, a=math.sqrt(5))
    if init is False:
        nn.init.kaiming_uniform_(B, a=math.sqrt(5))
    else:
        B.zero_()


@torch.no_grad()
def init_from_weight(W0: Tensor, r: int, s: float, method: str) -> tuple[Tensor, Tensor, Tensor]:
    """PiSSA or OLoRA: A, B from W0's principal directions, and the residual base W0 - s·B·A.

    PiSSA (Meng et al., 2024, https://arxiv.org/abs/2404.02948): W0 = U·S·Vᵀ; B = U_r·√(S_r/s), A = √(S_r/s)·V_rᵀ.
    OLoRA (Büyükakyüz, 2024, https://arxiv.org/abs/2406.01775): W0 = Q·R; B = Q_r, A = R_r.
    Returns (A (r, in), B (out, r), residual (out, in)) in float32; the model output is unchanged at init.
    """
    W = W0.float()  # (out, in)
    if method == "pissa":
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        root = (S[:r] / s).sqrt()  # (r,)
        A = root[:, None] * Vh[:r]  # (r, in)
        B = U[:, :r] * root[None, :]  # (out, r)
    elif method == "olora":
        Q, R = torch.linalg.qr(W)
        A, B = R[:r].contiguous(), Q[:, :r].contiguous()
    else:
        raise ConfigError(f"unknown weight-based init {method!r}; expected 'pissa' or 'olora'")
    return A, B, W - s * (B @ A)
