"""Density schedules: the fraction of candidate weights trained at step t of the tuning stage.

Pure functions of the step, t in [0, T3] (clipped), from density_min at t = 0 to density_max at t = T3
(supplementary Table 2 compares them; exponential is the paper's default).
"""

from __future__ import annotations

import math


def exponential(t: int, total: int, density_min: float, density_max: float) -> float:
    """delta_min * (delta_max / delta_min) ** (t / T3)."""
    return density_min * (density_max / density_min) ** _progress(t, total)


def linear(t: int, total: int, density_min: float, density_max: float) -> float:
    """delta_min + (delta_max - delta_min) * t / T3."""
    return density_min + (density_max - density_min) * _progress(t, total)


def cosine(t: int, total: int, density_min: float, density_max: float) -> float:
    """delta_min + (delta_max - delta_min) * (1 - cos(pi * t / T3)) / 2: slow, fast, slow."""
    return density_min + (density_max - density_min) * (1 - math.cos(math.pi * _progress(t, total))) / 2


SCHEDULES = {"exponential": exponential, "linear": linear, "cosine": cosine}


def density_at(name: str, t: int, total: int, density_min: float, density_max: float) -> float:
    """The density of schedule ``name`` at tuning step ``t`` of ``total``."""
    if name not in SCHEDULES:
        raise ValueError(f"schedule must be one of {sorted(SCHEDULES)}, got {name!r}")
    return SCHEDULES[name](t, total, density_min, density_max)


def _progress(t: int, total: int) -> float:
    return min(max(t, 0), total) / total
