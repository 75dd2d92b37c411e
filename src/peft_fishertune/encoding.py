"""Compact codes for a layer's flat indices in the adapter file.

A layer's k indices (flat positions into a weight of N entries) are saved as one uint8 blob of
segments: the active prefix [0, k_active) and the inactive rest [k_active, k), each coded by whichever
of these is smallest for it:

- ``packed``: ceil(log2 N) bits an index, any order (always below int32's 32 bits);
- ``bitmask``: one bit per weight entry, for a strictly ascending segment;
- ``rice``: Golomb-Rice codes of the gaps between ascending positions (unary quotient, b-bit remainder),
  for a strictly ascending segment. Near log2 C(N, k) bits at any density.

Set codes (bitmask, rice) keep no order, so they serve only segments that are already ascending; the
selection keeps the active prefix ascending where that costs nothing (see ``FisherTuneModel.select``).
Each segment: kind (u8), count (u64), parameter (u8), payload length (u64), payload; little-endian.
Decoding checks every length, count and range and raises ValueError naming the module.
"""

from __future__ import annotations

import math
import struct

import numpy as np
import torch

PACKED, BITMASK, RICE = 1, 2, 3
KIND_NAMES = {PACKED: "packed", BITMASK: "bitmask", RICE: "rice"}
_HEADER = struct.Struct("<BQBQ")


def encode(indices: torch.Tensor, active: int, numel: int) -> torch.Tensor:
    """The uint8 blob of ``indices`` (k flat positions, the first ``active`` of them the active prefix)."""
    positions = indices.detach().cpu().numpy().astype(np.int64)
    parts = [_encode_segment(seg, numel) for seg in (positions[:active], positions[active:]) if seg.size]
    return torch.from_numpy(np.frombuffer(b"".join(parts), dtype=np.uint8).copy())


def decode(blob: torch.Tensor, numel: int, count: int, where: str) -> torch.Tensor:
    """int32 positions from a blob written by ``encode``; ``count`` is how many there must be."""
    if blob.dtype != torch.uint8 or blob.dim() != 1:
        raise ValueError(f"{where}: index code must be a 1-D uint8 tensor, got {blob.dtype} {tuple(blob.shape)}")
    data = blob.cpu().numpy().tobytes()
    out, offset = [], 0
    while offset < len(data):
        if offset + _HEADER.size > len(data):
            raise ValueError(f"{where}: index code is truncated (segment header)")
        kind, n, param, length = _HEADER.unpack_from(data, offset)
        offset += _HEADER.size
        if offset + length > len(data):
            raise ValueError(f"{where}: index code is truncated ({KIND_NAMES.get(kind, kind)} payload)")
        payload = np.frombuffer(data, dtype=np.uint8, count=length, offset=offset)
        offset += length
        out.append(_decode_segment(kind, n, param, payload, numel, where))
    positions = np.concatenate(out) if out else np.zeros(0, dtype=np.int64)
    if positions.size != count:
        raise ValueError(f"{where}: index code holds {positions.size} indices, the values say {count}")
    if positions.size and (positions.min() < 0 or positions.max() >= numel):
        raise ValueError(f"{where}: index {int(positions.max())} is out of range for a weight of {numel} entries")
    return torch.from_numpy(positions.astype(np.int32))


def code_sizes(positions: np.ndarray, numel: int) -> dict[str, int]:
    """Payload bytes of each code that can hold this segment (set codes only for ascending segments)."""
    k = positions.size
    sizes = {"packed": math.ceil(k * _width(numel) / 8)}
    if _ascending(positions):
        sizes["bitmask"] = math.ceil(numel / 8)
        sizes["rice"] = _rice_size(_gaps(positions))[0]
    return sizes


def _encode_segment(positions: np.ndarray, numel: int) -> bytes:
    sizes = code_sizes(positions, numel)
    kind = min(sizes, key=sizes.get)
    k, param = positions.size, 0
    if kind == "packed":
        param = _width(numel)
        payload = _pack_fixed(positions, param)
    elif kind == "bitmask":
        bits = np.zeros(numel, dtype=np.uint8)
        bits[positions] = 1
        payload = np.packbits(bits).tobytes()
    else:
        gaps = _gaps(positions)
        param = _rice_size(gaps)[1]
        payload = _rice_encode(gaps, param)
    code = {"packed": PACKED, "bitmask": BITMASK, "rice": RICE}[kind]
    return _HEADER.pack(code, k, param, len(payload)) + payload


def _decode_segment(kind, n, param, payload, numel, where) -> np.ndarray:
    if kind == PACKED:
        if param < 1 or param > 63 or payload.size != math.ceil(n * param / 8):
            raise ValueError(f"{where}: packed index code has {payload.size} bytes for {n} indices of {param} bits")
        return _unpack_fixed(payload, n, param)
    if kind == BITMASK:
        if payload.size != math.ceil(numel / 8):
            raise ValueError(
                f"{where}: bitmask has {payload.size} bytes, a weight of {numel} entries needs "
                f"{math.ceil(numel / 8)} (truncated or from another model)"
            )
        positions = np.flatnonzero(np.unpackbits(payload)[:numel])
        if positions.size != n:
            raise ValueError(f"{where}: bitmask marks {positions.size} entries, its header says {n}")
        return positions
    if kind == RICE:
        return _rice_decode(payload, n, param, where)
    raise ValueError(f"{where}: unknown index code kind {kind}")


def _width(numel: int) -> int:
    return max(1, math.ceil(math.log2(max(numel, 2))))


def _ascending(positions: np.ndarray) -> bool:
    return positions.size == 0 or bool(np.all(np.diff(positions) > 0))


def _gaps(positions: np.ndarray) -> np.ndarray:
    return np.diff(positions, prepend=-1) - 1  # entries skipped before each position, >= 0


def _rice_size(gaps: np.ndarray) -> tuple[int, int]:
    """(payload bytes, parameter b) of the best Rice code for these gaps."""
    k = gaps.size
    mean = float(gaps.mean()) if k else 0.0
    centre = max(0, int(math.log2(mean * math.log(2) + 1)))
    best = None
    for b in range(max(0, centre - 2), centre + 3):
        unary_bits = int((gaps >> b).sum()) + k
        size = 8 + math.ceil(unary_bits / 8) + math.ceil(k * b / 8)
        if best is None or size < best[0]:
            best = (size, b)
    return best


def _rice_encode(gaps: np.ndarray, b: int) -> bytes:
    quotients = gaps >> b
    ends = np.cumsum(quotients + 1) - 1  # the 0 closing each unary code
    unary = np.ones(int(ends[-1]) + 1 if gaps.size else 0, dtype=np.uint8)
    unary[ends] = 0
    unary_bytes = np.packbits(unary).tobytes()
    remainders = _pack_fixed(gaps & ((1 << b) - 1), b) if b else b""
    return struct.pack("<Q", len(unary_bytes)) + unary_bytes + remainders


def _rice_decode(payload: np.ndarray, n: int, b: int, where: str) -> np.ndarray:
    if payload.size < 8:
        raise ValueError(f"{where}: rice index code is truncated")
    unary_length = struct.unpack("<Q", payload[:8].tobytes())[0]
    if b > 62 or payload.size != 8 + unary_length + math.ceil(n * b / 8):
        raise ValueError(
            f"{where}: rice index code has {payload.size} bytes, its lengths need "
            f"{8 + unary_length + math.ceil(n * b / 8)} (truncated or tampered)"
        )
    ends = np.flatnonzero(np.unpackbits(payload[8 : 8 + unary_length]) == 0)
    if ends.size < n:
        raise ValueError(f"{where}: rice index code holds {ends.size} gaps, its header says {n}")
    quotients = np.diff(ends[:n], prepend=-1) - 1
    remainders = _unpack_fixed(payload[8 + unary_length :], n, b) if b else np.zeros(n, dtype=np.int64)
    gaps = (quotients.astype(np.int64) << b) | remainders
    return np.cumsum(gaps + 1) - 1


def _pack_fixed(values: np.ndarray, width: int) -> bytes:
    shifts = np.arange(width - 1, -1, -1, dtype=np.int64)
    bits = ((values.astype(np.int64)[:, None] >> shifts) & 1).astype(np.uint8)  # (k, width), MSB first
    return np.packbits(bits.reshape(-1)).tobytes()


def _unpack_fixed(payload: np.ndarray, n: int, width: int) -> np.ndarray:
    bits = np.unpackbits(payload)[: n * width].reshape(n, width).astype(np.int64)
    return bits @ (1 << np.arange(width - 1, -1, -1, dtype=np.int64))
