"""Win rates and means with confidence intervals."""

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


@dataclass
class MeanInterval:
    """Mean of `n` values with a Student-t interval: `low = mean - half_width`, `high = mean + half_width`."""

    mean: float
    half_width: float
    n: int
    confidence: float = 0.95

    @property
    def low(self) -> float:
        return self.mean - self.half_width

    @property
    def high(self) -> float:
        return self.mean + self.half_width

    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    def to_dict(self) -> dict:
        return {**asdict(self), "low": self.low, "high": self.high}

    def __str__(self) -> str:
        return f"{self.mean:+.3f} ± {self.half_width:.3f}"


def mean_interval(values, confidence: float = 0.95) -> MeanInterval:
    """Mean of `values` and the two-sided Student-t interval `t(n-1) * sd / sqrt(n)` (sd with n - 1).

    For paired comparisons pass the per-seed differences. With one value the half width is infinite.
    """
    x = [float(v) for v in values]
    n = len(x)
    if n == 0:
        raise ValueError("mean_interval needs at least one value.")
    mean = sum(x) / n
    if n == 1:
        return MeanInterval(mean, math.inf, 1, confidence)
    sd = math.sqrt(sum((v - mean) ** 2 for v in x) / (n - 1))
    return MeanInterval(mean, t_quantile(0.5 + confidence / 2, n - 1) * sd / math.sqrt(n), n, confidence)


def t_quantile(q: float, df: int) -> float:
    """Quantile `q` (in (0.5, 1)) of Student's t with `df` degrees of freedom: bisection on its CDF, which is
    integrated numerically (Simpson's rule), so no scipy is needed."""
    if not 0.5 < q < 1 or df < 1:
        raise ValueError(f"t_quantile needs 0.5 < q < 1 and df >= 1, got q={q}, df={df}.")
    log_norm = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)

    def pdf(t: float) -> float:
        return math.exp(log_norm - (df + 1) / 2 * math.log1p(t * t / df))

    def cdf(t: float, steps: int = 2000) -> float:  # 0.5 + integral of the pdf over [0, t]
        h = t / steps
        inner = sum((4 if k % 2 else 2) * pdf(k * h) for k in range(1, steps))
        return 0.5 + h / 3 * (pdf(0.0) + inner + pdf(t))

    low, high = 0.0, 1.0
    while cdf(high) < q:
        low, high = high, 2 * high
    for _ in range(50):
        mid = (low + high) / 2
        low, high = (mid, high) if cdf(mid) < q else (low, mid)
    return (low + high) / 2
