"""A linear layer with a sparse delta on its weight, whose backward keeps no copy of the effective weight.

y = x @ (W + scatter(idx, v))^T + b. Autograd through ``index_add`` and ``F.linear`` would save the
effective weight (a dense copy of W per layer) from forward to backward. This function saves only x, W,
idx and v, and rebuilds the effective weight in backward for the input gradient. The gradient of v is
either gathered from the dense weight gradient grad_y^T @ x (``dense``: one matmul, as full fine-tuning
does, one layer's dense gradient alive at a time) or computed for the selected entries only
(``sparse``: sum over tokens of grad_y[:, row] * x[:, col], in chunks). ``auto`` picks ``sparse`` below the
active density ``sparse_density(device type)`` and ``dense`` above: a threshold per device type, measured by
benchmarks/sparse_backward.py (CPU) and benchmarks/device_check.sh (any device; it prints the threshold its
measurements imply). ``set_sparse_density("cuda", value)`` or the environment variable
``FISHERTUNE_SPARSE_DENSITY_CUDA`` sets it for a device type.
If W itself requires grad (the calibration pass), its dense gradient is returned as well.
"""

from __future__ import annotations

import os

import torch
from torch.nn import functional as F

# Active density below which ``auto`` uses the sparse backward, per device type.
# cpu: measured on a 2-core CPU (benchmarks/sparse_backward.py, 3072 x 768, 514 tokens): sparse is 0.70x dense
#   at 0.1% of the weight, 3.1x at 1%, 35x at 15%.
# cuda: not measured yet (no GPU run so far). The CPU value stands in: the sparse backward is a gather bound by
#   memory bandwidth and the dense one a matmul, and a GPU widens that gap, so a GPU threshold is unlikely to
#   be higher. benchmarks/device_check.sh prints the measured one.
SPARSE_DENSITY = {"cpu": 0.002, "cuda": 0.002}
_CHUNK = 1 << 16  # selected entries per chunk in the sparse backward


class SparseDeltaLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, positions, values, mode):
        effective = _effective(weight, positions, values)
        ctx.save_for_backward(x, weight, positions, values)
        ctx.has_bias = bias is not None
        ctx.mode = mode
        return F.linear(x, effective, bias)  # (..., out)

    @staticmethod
    def backward(ctx, grad_output):
        x, weight, positions, values = ctx.saved_tensors
        dtype = grad_output.dtype
        grad_x = grad_weight = grad_bias = grad_values = None
        g = grad_output.reshape(-1, grad_output.shape[-1])  # (N, out)
        if ctx.needs_input_grad[0]:
            effective = _effective(weight, positions, values).to(dtype)
            grad_x = (g @ effective).view(*grad_output.shape[:-1], weight.shape[1])  # (..., in)
        inputs = x.reshape(-1, x.shape[-1]).to(dtype)  # (N, in)
        if ctx.needs_input_grad[1] or (ctx.needs_input_grad[4] and not _use_sparse(ctx.mode, values, weight)):
            dense = g.t() @ inputs  # (out, in)
            if ctx.needs_input_grad[1]:
                grad_weight = dense.to(weight.dtype)
            if ctx.needs_input_grad[4]:
                grad_values = dense.reshape(-1)[positions].to(values.dtype)
        elif ctx.needs_input_grad[4]:
            grad_values = _selected_grad(g, inputs, positions, weight.shape[1]).to(values.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = g.sum(0)
        return grad_x, grad_weight, grad_bias, None, grad_values, None


def sparse_delta_linear(x, weight, bias, positions, values, mode: str = "auto"):
    """F.linear(x, W + scatter(positions, values), bias) without saving the effective weight."""
    return SparseDeltaLinear.apply(x, weight, bias, positions, values, mode)


def _effective(weight, positions, values):
    return weight.reshape(-1).index_add(0, positions, values.to(weight.dtype)).view_as(weight)


def sparse_density(device_type: str) -> float:
    """The active density below which ``auto`` computes the deltas' gradient sparsely on ``device_type``."""
    override = os.environ.get(f"FISHERTUNE_SPARSE_DENSITY_{device_type.upper()}")
    if override is not None:
        try:
            return _check_density(float(override), device_type)
        except ValueError as error:
            raise ValueError(f"FISHERTUNE_SPARSE_DENSITY_{device_type.upper()}={override!r}: {error}") from None
    return SPARSE_DENSITY.get(device_type, SPARSE_DENSITY["cpu"])  # other device types: the measured CPU value


def set_sparse_density(device_type: str, density: float) -> None:
    """Set the ``auto`` threshold of ``device_type`` (e.g. from benchmarks/device_check.sh on your GPU)."""
    SPARSE_DENSITY[device_type] = _check_density(density, device_type)


def _check_density(density: float, device_type: str) -> float:
    if not 0.0 <= density <= 1.0:
        raise ValueError(f"the sparse-backward density threshold for {device_type!r} must lie in [0, 1], got {density}")
    return density


def _use_sparse(mode: str, values, weight) -> bool:
    if mode == "auto":
        return values.numel() < sparse_density(weight.device.type) * weight.numel()
    return mode == "sparse"


def _selected_grad(g, inputs, positions, in_features):
    """grad of each selected entry (row r, column c): sum over tokens of g[:, r] * inputs[:, c]."""
    out = torch.empty(positions.numel(), dtype=g.dtype, device=g.device)
    rows, cols = positions // in_features, positions % in_features
    for start in range(0, positions.numel(), _CHUNK):
        r, c = rows[start : start + _CHUNK], cols[start : start + _CHUNK]
        out[start : start + _CHUNK] = (g[:, r] * inputs[:, c]).sum(0)  # (N, chunk) -> (chunk,)
    return out
