"""Packed multi-bit binary codes and their scores.

A code of ``B`` bits per dim is ``B`` bit planes ``b_0 .. b_{B-1}`` in {-1, +1}^m; its float form is
``e = sum_i 2^-i * b_i`` (Gan et al., "Binary Embedding-based Retrieval at Tencent", KDD 2023). Planes are
stored with ``numpy.packbits`` (bit 1 means +1), one uint8 row of ``m / 8`` bytes per plane, plus the
float form's norm. The inner product of two codes needs only popcounts:

    <e_q, e_d> = sum_{i,j} 2^-(i+j) * (m - 2 * Hamming(b_i^q, b_j^d))

**The one scoring rule** of this project (``code_scores``): two codes score the cosine of their float forms,

    s(q, d) = <e_q, e_d> / (|e_q| |e_d|)

It is what the training losses optimise (dot products of normalised float forms), what the evaluation ranks
by, what an exported binary cell's similarity computes and what search helpers must reproduce. For 1 bit all
norms are ``sqrt(m)``, so it ranks exactly like Hamming distance; for more bits the raw inner product would
favour documents whose code has a large norm (measured on cranfield, cisi and npl: cosine ranks better at
every depth).

Dims must be a multiple of 8: packbits would otherwise pad with zero bits, which read as -1 and would
change every score, so such dims are refused rather than padded.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from trainer.errors import UserError


def check_packable(dim: int) -> None:
    if dim % 8:
        raise UserError(
            f"dim {dim} is not a multiple of 8: numpy.packbits would pad each plane with zero bits (read as -1), "
            "so binary cells need dims divisible by 8, e.g. 32, 64, 128"
        )


def plane_weights(bits: int) -> np.ndarray:
    return 2.0 ** -np.arange(bits, dtype=np.float64)


def sign_dot(a: np.ndarray, b: np.ndarray, dim: int) -> np.ndarray:
    """``<s_a, s_b> = dim - 2 popcount(a xor b)`` of packed +-1 planes (..., dim/8), as int64 (broadcasting)."""
    return dim - 2 * np.bitwise_count(np.bitwise_xor(a, b)).sum(axis=-1, dtype=np.int64)


def float_form_norms(packed: np.ndarray, dim: int) -> np.ndarray:
    """float32 ``|e|`` of the float forms ``e = sum_i 2^-i s_i`` of packed planes (N, bits, dim/8), exactly:
    ``|e|^2 = sum_ij 2^-(i+j) <s_i, s_j>`` with ``<s_i, s_j> = dim - 2 popcount(p_i xor p_j)``, every term a
    small dyadic number, so the float64 sum is exact (no unpacking)."""
    weights = plane_weights(packed.shape[1])
    squared = np.zeros(len(packed), dtype=np.float64)
    for i in range(packed.shape[1]):
        squared += weights[i] ** 2 * dim
        for j in range(i + 1, packed.shape[1]):
            squared += 2 * weights[i] * weights[j] * sign_dot(packed[:, i], packed[:, j], dim)
    return np.sqrt(squared).astype(np.float32)


@dataclass(frozen=True)
class PackedCodes:
    """``packed``: uint8 (N, bits, dim/8); ``norms``: float32 (N,) norm of each float form."""

    packed: np.ndarray
    dim: int
    norms: np.ndarray

    @property
    def bits(self) -> int:
        return self.packed.shape[1]

    @property
    def bytes_per_vector(self) -> int:
        return self.packed.shape[1] * self.packed.shape[2]

    def __len__(self) -> int:
        return self.packed.shape[0]

    @classmethod
    def from_planes(cls, planes: np.ndarray) -> PackedCodes:
        """``planes``: (N, bits, dim), positive entries are +1 bits, the rest -1."""
        planes = np.asarray(planes)
        planes = planes if planes.dtype == bool else planes > 0
        if planes.ndim != 3:
            raise UserError(f"planes must have shape (N, bits, dim), got {planes.shape}")
        check_packable(planes.shape[2])
        packed = np.packbits(planes, axis=2)
        return cls(packed, planes.shape[2], float_form_norms(packed, planes.shape[2]))

    def unpack(self) -> np.ndarray:
        """Bool planes (N, bits, dim)."""
        return np.unpackbits(self.packed, axis=2, count=self.dim).astype(bool)

    def at_depth(self, bits: int) -> PackedCodes:
        """The nested code of fewer bits: its first ``bits`` planes."""
        if not 1 <= bits <= self.bits:
            raise UserError(f"bits={bits} is not available: these codes have depths 1..{self.bits}")
        if bits == self.bits:
            return self
        return PackedCodes.from_planes(self.unpack()[:, :bits])

    def to_float(self) -> np.ndarray:
        """Float form ``e = sum_i 2^-i b_i`` (N, dim), float64, exact."""
        return np.einsum("nbm,b->nm", self.unpack() * 2.0 - 1.0, plane_weights(self.bits))


def positive(x: np.ndarray) -> np.ndarray:
    """``x > 0`` of a float array, read from its bit patterns: an IEEE float (NaN aside) is above zero exactly
    when its bits, read as a signed integer, are (numpy compares float16 10-20x slower than int16)."""
    if x.dtype.kind != "f":
        return x > 0
    return x.view({2: np.int16, 4: np.int32, 8: np.int64}[x.dtype.itemsize]) > 0


def sign_codes(embeddings: np.ndarray) -> PackedCodes:
    """Parameter-free baseline: one plane, the sign of each coordinate (0 counts as -1)."""
    return PackedCodes.from_planes(positive(np.asarray(embeddings))[:, None, :])


def inner_products(queries: PackedCodes, docs: PackedCodes, chunk: int = 256) -> np.ndarray:
    """(Q, D) float64 inner products of the float forms, from XOR + popcount on the packed planes."""
    if queries.dim != docs.dim or queries.bits != docs.bits:
        raise UserError(
            f"codes differ: queries have {queries.bits}x{queries.dim} bits, documents {docs.bits}x{docs.dim}"
        )
    weights = plane_weights(queries.bits)
    scores = np.zeros((len(queries), len(docs)), dtype=np.float64)
    for start in range(0, len(queries), chunk):
        q = queries.packed[start : start + chunk]
        for i in range(queries.bits):
            for j in range(docs.bits):
                dots = sign_dot(q[:, None, i, :], docs.packed[None, :, j, :], queries.dim)
                scores[start : start + chunk] += weights[i] * weights[j] * dots
    return scores


def code_scores(queries: PackedCodes, docs: PackedCodes) -> np.ndarray:
    """(Q, D) scores of codes: the cosine of their float forms, from popcounts and the stored norms (the rule)."""
    return inner_products(queries, docs) / np.outer(queries.norms, docs.norms).clip(min=1e-12)


def quantized_baseline_scores(
    queries: np.ndarray, docs: np.ndarray, precision: str, calibration: np.ndarray | None = None
) -> np.ndarray:
    """(Q, D) scores of sentence-transformers' ``quantize_embeddings`` baselines, kept beside every comparison.

    - ``ubinary``: one bit per dim (``x > 0``, packed); score ``dim - 2 * Hamming``, which equals the inner
      product of the sign codes (``sign_codes``) exactly.
    - ``int8``: each dim mapped to 256 levels between its min and max over ``calibration`` (default: the
      documents), the same ranges for queries and documents; score the dot product of the de-quantised
      vectors (each level's bin centre, ``min + (level + 0.5) * step``), as a scalar-quantised index scores them.
    """
    from sentence_transformers.util import quantize_embeddings

    queries, docs = np.asarray(queries, dtype=np.float32), np.asarray(docs, dtype=np.float32)
    if precision == "ubinary":
        check_packable(queries.shape[1])
        q, d = quantize_embeddings(queries, "ubinary"), quantize_embeddings(docs, "ubinary")
        hamming = np.bitwise_count(np.bitwise_xor(q[:, None, :], d[None, :, :])).sum(axis=-1, dtype=np.int64)
        return (queries.shape[1] - 2 * hamming).astype(np.float64)
    if precision == "int8":
        reference = docs if calibration is None else np.asarray(calibration, dtype=np.float32)
        ranges = np.stack([reference.min(axis=0), reference.max(axis=0)])
        step = (ranges[1] - ranges[0]) / 255

        def dequantize(x: np.ndarray) -> np.ndarray:
            levels = quantize_embeddings(x, "int8", ranges=ranges).astype(np.float64) + 128
            return (levels + 0.5) * step + ranges[0]

        return dequantize(queries) @ dequantize(docs).T
    raise UserError(f"precision: {precision!r} is not a baseline; use 'ubinary' or 'int8'")
