"""The DR-FIM equations as pure functions of tensors (supplementary material of the paper, Eq. 12-15).

Notation: F is the diagonal Fisher information of each weight, Lambda the diagonal precision of the
Gaussian posterior q = N(theta_hat, Lambda^-1), gamma the weight of KL(q || p) and tau the standard
deviation of the prior p = N(theta_pt, tau^2 I). x are clean batches, x' domain-shifted ones.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

# gamma * tau^-2 at the paper's defaults (gamma = tau = 0.01): the prior floor that the "median" scale puts at
# the median Fisher information of the candidates.
REFERENCE_FLOOR = 0.01 * 0.01**-2
FISHER_SCALES = ("median", "loss")


def precision_from_fisher(fisher: torch.Tensor, gamma: float, tau: float) -> torch.Tensor:
    """gamma * Lambda = F + gamma * tau^-2 (Eq. 12), so Lambda = F / gamma + tau^-2."""
    return fisher / gamma + tau**-2


def fisher_from_precision(precision: torch.Tensor, gamma: float, tau: float) -> torch.Tensor:
    """F = gamma * (Lambda - tau^-2) (Eq. 13)."""
    return gamma * (precision - tau**-2)


def domain_term_eq15(
    precision_x: torch.Tensor, precision_shifted: torch.Tensor, w: float, gamma: float, eps: float
) -> torch.Tensor:
    """Eq. 15's domain term: gamma * w * |Lambda_x - Lambda_x'| / (min(Lambda_x, Lambda_x') + eps / gamma)."""
    denominator = torch.minimum(precision_x, precision_shifted) + eps / gamma
    return gamma * w * (precision_x - precision_shifted).abs() / denominator


def domain_term_from_fisher(
    fisher_x: torch.Tensor, fisher_shifted: torch.Tensor, w: float, gamma: float, tau: float, eps: float
) -> torch.Tensor:
    """Eq. 15's domain term written in F: gamma * w * |F - F'| / (min(F, F') + eps + gamma * tau^-2).

    Algebraically equal to ``domain_term_eq15`` of the precisions Lambda = F / gamma + tau^-2, but free of
    the cancellation that Lambda - tau^-2 suffers in float32 when F / gamma is far below tau^-2 (with the
    defaults gamma = tau = 0.01 and a mean loss, F ~ 1e-8 against tau^-2 = 1e4 loses F entirely).
    """
    denominator = torch.minimum(fisher_x, fisher_shifted) + eps + gamma * tau**-2
    return gamma * w * (fisher_x - fisher_shifted).abs() / denominator


def drf_eq15(
    precision_x: torch.Tensor, precision_shifted: torch.Tensor, w: float, gamma: float, tau: float, eps: float
) -> torch.Tensor:
    """Eq. 15, DRF =
    gamma * (Lambda_x - tau^-2 + w * |Lambda_x - Lambda_x'| / (min(Lambda_x, Lambda_x') + eps / gamma)).

    (Written for the precisions; the calibration uses the equal F form of the domain term.)
    """
    task = fisher_from_precision(precision_x, gamma, tau)
    return task + domain_term_eq15(precision_x, precision_shifted, w, gamma, eps)


def drf_eq14(fisher_x: torch.Tensor, fisher_shifted: torch.Tensor, w: float, eps: float) -> torch.Tensor:
    """DRF = F(x) + w * |F(x) - F(x')| / (min(F(x), F(x')) + eps) (Eq. 14)."""
    ratio = (fisher_x - fisher_shifted).abs() / (torch.minimum(fisher_x, fisher_shifted) + eps)
    return fisher_x + w * ratio


def fisher_unit(fisher: Mapping[str, torch.Tensor], scale: str) -> float:
    """The unit in which Eq. 15 reads F(x) and F(x'): F is divided by it before the domain term is formed.

    - ``"loss"``: 1, F as the loss returns it (the literal reading). F then scales with the square of the
      loss, so where the fixed floor gamma * tau^-2 falls among the F values depends on the loss reduction,
      the image size and the batch size (with a mean loss, F ~ 1e-8 sits far below the floor of 100).
    - ``"median"``: median(F(x)) / REFERENCE_FLOOR, the median over the candidate weights that have any Fisher
      information (F > 0). At the paper's gamma = tau = 0.01 the floor gamma * tau^-2 then equals the median
      F: half of the weights have more Fisher information than the prior, half less. gamma and tau move the
      floor along the distribution (twice gamma: twice the median; twice tau: a quarter of it). Multiplying
      the loss by c multiplies F and the unit by c^2, so the domain term no longer depends on the loss scale.
    """
    if scale == "loss":
        return 1.0
    if scale != "median":
        raise ValueError(f"fisher_scale must be one of {FISHER_SCALES}, got {scale!r}")
    from .selection import kth_largest

    tensors = [t.detach().reshape(-1).float() for t in fisher.values()]
    positive = sum(int((t > 0).sum()) for t in tensors)
    if positive == 0:
        return 1.0
    # F >= 0, so the ceil(P/2)-th largest of all entries is the median of the P positive ones.
    median = kth_largest(tensors, (positive + 1) // 2)
    return median / REFERENCE_FLOOR


def perturbation_weight(eps_mu: float, eps_sigma: float) -> float:
    """w = exp(-(eps_mu + eps_sigma)) (Eq. 14): a stronger drawn shift counts less."""
    return float(torch.exp(-torch.tensor(eps_mu + eps_sigma, dtype=torch.float64)))


def combine(task: dict[str, torch.Tensor], domain: dict[str, torch.Tensor], lam: float) -> dict[str, torch.Tensor]:
    """(1 - lambda) * F + lambda * dF (supplementary Table 1), each term first divided by its global mean.

    The two terms have different units (F scales with the square of the loss, the domain term is a
    ratio), so without a common scale lambda would only decide which one swamps the other. Dividing each
    by its mean over ALL candidate weights puts both at mean 1, keeps each term's global ranking, and
    makes the combination independent of the loss scale whenever the domain term is. A term whose mean is
    0 (for example x' == x) contributes 0.
    """
    task_mean = _global_mean(task)
    domain_mean = _global_mean(domain)
    combined = {}
    for name in task:
        t = task[name] / task_mean if task_mean > 0 else torch.zeros_like(task[name])
        d = domain[name] / domain_mean if domain_mean > 0 else torch.zeros_like(domain[name])
        combined[name] = (1 - lam) * t + lam * d
    return combined


def _global_mean(tensors: dict[str, torch.Tensor]) -> float:
    total = sum(float(t.double().sum()) for t in tensors.values())
    count = sum(t.numel() for t in tensors.values())
    return total / count if count else 0.0
