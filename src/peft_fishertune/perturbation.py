"""The domain shift x': a DSU-style perturbation of feature statistics (Li et al., ICLR 2022).

For a feature map f, per sample and channel, mu and sigma are taken over the spatial/token axes;
Sigma_mu and Sigma_sigma are their standard deviations across the batch. With noise eps_mu, eps_sigma:

    mu' = mu + s * eps_mu * Sigma_mu,    sigma' = sigma + s * eps_sigma * Sigma_sigma
    f'  = sigma' * (f - mu) / sigma + mu'

where s is the strength. Our choice for Eq. 14's weight w = exp(-(eps_mu + eps_sigma)): eps_mu and eps_sigma
are ONE pair of scalars per batch (drawn from N(0, 1), shared by every sample and channel, scaled per
channel by that batch's Sigma), so every batch has exactly one w and the formula applies as written. The
pair is a function of the seed and the batch's global index only, so any number of processes draws the
same shift for the same batch.

Layouts: 4-D tensors are (B, C, H, W), 3-D tensors are tokens (B, N, C). sigma' is clamped at a small
positive value so that a large negative draw cannot flip the sign of the features.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from .drfim import perturbation_weight

_STAT_EPS = 1e-6


@dataclass(frozen=True)
class ShiftDraw:
    """The noise of one batch and its Eq. 14 weight."""

    eps_mu: float
    eps_sigma: float

    @property
    def weight(self) -> float:
        return perturbation_weight(self.eps_mu, self.eps_sigma)


class DomainShift:
    """Seeded feature-statistics shift, applied to a module's output or to the model's input pixels.

    Use it for the calibration's x' or as augmentation while training::

        shift = DomainShift(strength=1.0, seed=0)
        with shift.applied(model, module_name="backbone.embeddings.patch_embeddings", draw=shift.draw(step)):
            loss = model(**batch).loss
    """

    def __init__(self, strength: float = 1.0, seed: int = 0):
        if strength < 0:
            raise ValueError(f"strength must be >= 0, got {strength!r}")
        self.strength = strength
        self.seed = seed

    def draw(self, batch_index: int) -> ShiftDraw:
        """The noise pair of the batch with this global index (the same in every process)."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + batch_index)
        eps = torch.randn(2, generator=generator, dtype=torch.float64)
        return ShiftDraw(float(eps[0]), float(eps[1]))

    def shift(self, features: torch.Tensor, draw: ShiftDraw) -> torch.Tensor:
        """f' for a (B, C, H, W) or (B, N, C) tensor; the tensor itself when the strength is 0."""
        if self.strength == 0:
            return features
        if features.dim() == 4:
            reduce_dims = (2, 3)
        elif features.dim() == 3:
            reduce_dims = (1,)
        else:
            raise ValueError(f"DomainShift needs a (B, C, H, W) or (B, N, C) tensor, got shape {tuple(features.shape)}")
        f = features.float()
        mu = f.mean(dim=reduce_dims, keepdim=True)  # (B, C, 1, 1) or (B, 1, C)
        sigma = (f.var(dim=reduce_dims, keepdim=True, unbiased=False) + _STAT_EPS).sqrt()
        if f.shape[0] > 1:
            spread_mu = mu.std(dim=0, keepdim=True, unbiased=False)  # (1, C, 1, 1) or (1, 1, C)
            spread_sigma = sigma.std(dim=0, keepdim=True, unbiased=False)
        else:  # one sample has no batch spread: no shift
            spread_mu = spread_sigma = torch.zeros_like(mu)
        new_mu = mu + self.strength * draw.eps_mu * spread_mu
        new_sigma = (sigma + self.strength * draw.eps_sigma * spread_sigma).clamp_min(_STAT_EPS)
        shifted = new_sigma * (f - mu) / sigma + new_mu
        return shifted.to(features.dtype)

    @contextlib.contextmanager
    def applied(self, model: nn.Module, module_name: str | None, draw: ShiftDraw, input_key: str = "pixel_values"):
        """While active, ``module_name``'s output (or, when None, the model's input pixels) is shifted.

        For the pixel case the input is the ``input_key`` keyword argument of ``model``'s forward, or its
        first positional argument.
        """
        if self.strength == 0:  # the identity: nothing to hook
            yield
            return
        handle = self.attach(model, module_name, lambda: draw, input_key)
        try:
            yield
        finally:
            handle.remove()

    def attach(self, model: nn.Module, module_name: str | None, current_draw, input_key: str = "pixel_values"):
        """Shift on every forward for which ``current_draw()`` returns a draw (None: leave it alone).

        Returns the hook handle; ``handle.remove()`` detaches it. Used for augmentation while training.
        """
        if module_name is None:
            return model.register_forward_pre_hook(self._input_hook(current_draw, input_key), with_kwargs=True)
        try:
            module = model.get_submodule(module_name)
        except AttributeError as error:
            raise ValueError(f"perturb_module {module_name!r} is not a module of the model") from error
        return module.register_forward_hook(self._output_hook(current_draw))

    def _input_hook(self, current_draw, input_key: str):
        def hook(module, args, kwargs):
            draw = current_draw()
            if draw is None:
                return None
            if input_key in kwargs:
                kwargs = {**kwargs, input_key: self.shift(kwargs[input_key], draw)}
            elif args and isinstance(args[0], torch.Tensor):
                args = (self.shift(args[0], draw),) + tuple(args[1:])
            else:
                raise ValueError(f"no {input_key!r} argument or positional tensor to shift in the model's input")
            return args, kwargs

        return hook

    def _output_hook(self, current_draw):
        def hook(module, args, output):
            draw = current_draw()
            if draw is None:
                return None
            if isinstance(output, torch.Tensor):
                return self.shift(output, draw)
            if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
                return (self.shift(output[0], draw),) + tuple(output[1:])
            raise ValueError(f"cannot shift the output of {type(module).__name__}: {type(output).__name__}")

        return hook
