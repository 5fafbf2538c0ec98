"""Win rates with confidence intervals."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch


@dataclass
class WinRate:
    """Share of paired comparisons `a` wins over `b` (a tie counts as half a win), with a Wilson score interval."""

    rate: float
    low: float
    high: float
    wins: int
    ties: int
    losses: int
    confidence: float = 0.95

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        interval = f"[{100 * self.low:.1f}, {100 * self.high:.1f}]"
        return f"{100 * self.rate:.1f}% {interval} ({self.wins}W/{self.ties}T/{self.losses}L)"


def win_rate(a: torch.Tensor, b: torch.Tensor, confidence: float = 0.95) -> WinRate:
    """Win rate of scores `a` over paired scores `b` (same prompt and seed), and its Wilson score interval.

    With n comparisons and rate p (ties as half wins), z the two-sided normal quantile of `confidence`:
    centre = (p + z^2 / 2n) / (1 + z^2 / n), half width = z sqrt(p (1 - p) / n + z^2 / 4n^2) / (1 + z^2 / n).
    """
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    if a.shape != b.shape or a.numel() == 0:
        raise ValueError(
            f"win_rate needs two non-empty score tensors of one shape, got {tuple(a.shape)} and {tuple(b.shape)}."
        )
    wins, ties = int((a > b).sum()), int((a == b).sum())
    n = a.numel()
    p = (wins + 0.5 * ties) / n
    z = _normal_quantile(0.5 + confidence / 2)
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return WinRate(p, max(0.0, centre - half), min(1.0, centre + half), wins, ties, n - wins - ties, confidence)


def _normal_quantile(q: float) -> float:
    return float(torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor(q, dtype=torch.float64)))
