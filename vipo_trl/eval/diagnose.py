"""How noisy is a preference set, and which Poly-DPO alpha does it want? (`diagnose`, `vipo-trl diagnose`)

Both images of every pair are scored by K scorers. Reported:

* per scorer: the share of pairs where it prefers the labelled winner (`agree`), the loser (`disagree`), or scores
  both the same (`tie`); `agreement` = agree / (agree + disagree);
* `consistency`: the share of pairs on which every scorer prefers the labelled winner (the ViPO paper's statistic:
  20.79% of Pick-a-Pic v2 pairs with five scorers);
* `easy_share`: the share of pairs told apart trivially: every scorer prefers the winner, and finds the loser hardly
  more about its prompt than about other prompts of the set (see `summarize`);
* the same per category when the set has a category column;
* a suggested alpha and the reason (`suggest_alpha`).
"""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..utils import pyplot_or_none
from .evaluate import resolve_scorers
from .scorers import RewardScorer

#: `consistency` at or below which a set counts as noisy and conflicting (Pick-a-Pic v2: 0.21), and at or above
#: which it counts as clean; between the two alpha is interpolated.
NOISY_CONSISTENCY, CLEAN_CONSISTENCY = 0.25, 0.6
#: `easy_share` at or above which a set counts as over-simple.
EASY_SHARE = 0.5
#: The alpha the ViPO authors used on Pick-a-Pic v2, the noisiest regime.
NOISY_ALPHA = 8.0
#: What the alpha study measured on each set (docs/alpha_study/results.json, seeds 0-7, paired against alpha 0).
CLEAN_FINDING = (
    "no alpha beat Diffusion-DPO (alpha -1..1 within 0.009 of it, none significantly; alpha 8 lost 0.041 +- 0.036; "
    "8 seeds)"
)
NOISY_FINDING = "no alpha in -1..8 beat Diffusion-DPO (all within 0.004 of it, none significantly; 8 seeds)"
EASY_FINDING = (
    "alpha -0.5 beat Diffusion-DPO by 0.010 +- 0.005 reward (the only alpha that did; 8 seeds), though Diffusion-DPO "
    "at alpha -1's smaller effective learning rate beat alpha -1 itself"
)


@dataclass
class ScorerAgreement:
    agree: float
    disagree: float
    tie: float

    @property
    def agreement(self) -> float:
        decided = self.agree + self.disagree
        return self.agree / decided if decided else float("nan")


@dataclass
class Diagnosis:
    """The report of `diagnose`: see the module docstring for each figure."""

    pairs: int
    scorers: dict[str, ScorerAgreement]
    consistency: float
    easy_share: float
    suggested_alpha: float
    reason: str
    categories: dict[str, dict[str, float]] = field(default_factory=dict)
    skipped_rows: dict[str, int] = field(default_factory=dict)  # rows passed over, by reason, as the trainer would

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for name, agreement in self.scorers.items():
            out["scorers"][name]["agreement"] = agreement.agreement
        return out

    def __str__(self) -> str:
        counts = ", ".join(f"{n} {reason}" for reason, n in sorted(self.skipped_rows.items()))
        skipped = f" (rows skipped as training would skip them: {counts})" if self.skipped_rows else ""
        lines = [f"{self.pairs} pairs scored by {len(self.scorers)} scorer(s){skipped}"]
        for name, a in self.scorers.items():
            lines.append(
                f"  {name:>12}: agrees with the label on {100 * a.agree:.1f}%, disagrees {100 * a.disagree:.1f}%, "
                f"ties {100 * a.tie:.1f}% (agreement {100 * a.agreement:.1f}% of decided pairs)"
            )
        lines.append(f"  consistency (every scorer prefers the labelled winner): {100 * self.consistency:.1f}%")
        lines.append(f"  easy pairs (the loser hardly about its prompt): {100 * self.easy_share:.1f}%")
        for name, figures in self.categories.items():
            lines.append(
                f"  category {name}: {figures['pairs']:.0f} pairs, consistency {100 * figures['consistency']:.1f}%, "
                f"easy {100 * figures['easy_share']:.1f}%, suggested alpha {figures['suggested_alpha']:+.2f}"
            )
        lines.append(f"suggested poly_alpha: {self.suggested_alpha:+.2f} ({self.reason})")
        return "\n".join(lines)


@dataclass(frozen=True)
class MeasuredSet:
    """A preference set of the alpha study: what `diagnose` reports for it and which alpha the study found best."""

    name: str
    consistency: float
    easy_share: float
    best_alpha: float
    finding: str


#: The alpha study (`examples/alpha_ablation.py`, results in docs/alpha_study) on the embedded default's three sets,
#: with `diagnose`'s figures for each (the shapes reward as the one scorer, seed-0 sets). `best_alpha` is the grid's
#: alpha whose paired gain over alpha 0 had a 95% interval above 0, or 0 when none had.
MEASURED_SETS = (
    MeasuredSet("clean", consistency=1.000, easy_share=0.072, best_alpha=0.0, finding=CLEAN_FINDING),
    MeasuredSet("noisy", consistency=0.312, easy_share=0.122, best_alpha=0.0, finding=NOISY_FINDING),
    MeasuredSet("easy", consistency=0.972, easy_share=0.618, best_alpha=-0.5, finding=EASY_FINDING),
)


def suggest_alpha(consistency: float, easy_share: float) -> tuple[float, str]:
    """The alpha measured best on the alpha study's set nearest to this one (in consistency and easy share), and why.

    This is a measurement on one toy world, three sets, not a law: the reason quotes what the study found there and
    what the ViPO paper's regimes (`paper_alpha`) would say. No alpha is chosen automatically during training.
    """
    nearest = min(MEASURED_SETS, key=lambda m: (m.consistency - consistency) ** 2 + (m.easy_share - easy_share) ** 2)
    paper, regime = paper_alpha(consistency, easy_share)
    return nearest.best_alpha, (
        f"consistency {100 * consistency:.0f}%, easy share {100 * easy_share:.0f}%: nearest to the alpha study's "
        f"{nearest.name} set ({100 * nearest.consistency:.0f}%, {100 * nearest.easy_share:.0f}%), where "
        f"{nearest.finding}; the ViPO paper's regimes would suggest {paper:+g} ({regime})"
    )


def paper_alpha(consistency: float, easy_share: float) -> tuple[float, str]:
    """Alpha from the ViPO paper's three regimes as read here (not measured): over-simple data wants alpha < 0, noisy
    and conflicting data alpha > 0 (8 on Pick-a-Pic v2), clean balanced data alpha near 0 (Diffusion-DPO)."""
    if easy_share >= EASY_SHARE:
        return (-0.5 if easy_share < 0.8 else -1.0), "over-simple data"
    if consistency >= CLEAN_CONSISTENCY:
        return 0.0, "consistent data"
    share = min(1.0, (CLEAN_CONSISTENCY - consistency) / (CLEAN_CONSISTENCY - NOISY_CONSISTENCY))
    return round(NOISY_ALPHA * share, 1), "noisy, conflicting data"


def pair_scores(
    scorers: Sequence[RewardScorer],
    chosen: Sequence[Any],
    rejected: Sequence[Any],
    prompts: Sequence[str],
    shuffles: int = 2,
    seed: int = 0,
) -> dict[str, dict[str, torch.Tensor]]:
    """Each scorer's scores of chosen and rejected under their own prompt, and (averaged over `shuffles` draws) under
    another prompt of the set: how much an image is about its own prompt is what tells an easy pair."""
    rng = random.Random(seed)
    distinct = list(dict.fromkeys(prompts))
    others = []
    for _ in range(shuffles if len(distinct) > 1 else 0):
        drawn = []
        for prompt in prompts:
            j = rng.randrange(len(distinct) - 1)
            drawn.append(distinct[-1] if distinct[j] == prompt else distinct[j])  # any prompt but its own
        others.append(drawn)
    out = {}
    for scorer in scorers:
        entry = {"chosen": scorer.score(chosen, prompts), "rejected": scorer.score(rejected, prompts)}
        if others:
            entry["chosen_other"] = torch.stack([scorer.score(chosen, o) for o in others]).mean(0)
            entry["rejected_other"] = torch.stack([scorer.score(rejected, o) for o in others]).mean(0)
        out[scorer.name] = entry
    return out


def summarize(
    scores: dict[str, dict[str, torch.Tensor]],
    categories: Sequence[str] | None = None,
    easy_relevance: float = 0.25,
) -> Diagnosis:
    """The diagnosis from each scorer's scores (`pair_scores`).

    A pair is easy when every scorer prefers the winner and the loser is hardly about the prompt: its score gain from
    its own prompt over other prompts is at most `easy_relevance` times the winner's (an image made for another
    prompt, as in the ViPO paper's over-simple set, gains nothing).
    """
    agreements, agree_all, easy_all = {}, None, None
    for name, entry in scores.items():
        chosen, rejected = entry["chosen"].double(), entry["rejected"].double()
        diff = chosen - rejected
        agreements[name] = ScorerAgreement(
            float((diff > 0).double().mean()), float((diff < 0).double().mean()), float((diff == 0).double().mean())
        )
        agree = diff > 0
        if "chosen_other" in entry:
            relevance_w = chosen - entry["chosen_other"].double()
            relevance_l = rejected - entry["rejected_other"].double()
            easy = agree & (relevance_w > 0) & (relevance_l <= easy_relevance * relevance_w)
        else:  # one prompt only: nothing to compare with
            easy = torch.zeros_like(agree)
        agree_all = agree if agree_all is None else agree_all & agree
        easy_all = easy if easy_all is None else easy_all & easy
    consistency, easy_share = float(agree_all.double().mean()), float(easy_all.double().mean())
    alpha, reason = suggest_alpha(consistency, easy_share)
    per_category = {}
    if categories is not None:
        for name in sorted(set(map(str, categories))):
            rows = torch.tensor([str(c) == name for c in categories])
            c, e = float(agree_all[rows].double().mean()), float(easy_all[rows].double().mean())
            per_category[name] = {
                "pairs": float(rows.sum()),
                "consistency": c,
                "easy_share": e,
                "suggested_alpha": suggest_alpha(c, e)[0],
            }
    return Diagnosis(len(agree_all), agreements, consistency, easy_share, alpha, reason, per_category)


def diagnose(
    dataset: Any,
    scorers: Sequence[str | RewardScorer],
    options: Any = None,
    max_pairs: int | None = None,
    easy_relevance: float = 0.25,
    prompt_shuffles: int = 2,
    output_dir: str | Path | None = None,
    device: str | None = None,
) -> Diagnosis:
    """Diagnose a preference set (any schema the trainer reads, resolved with `options`, a
    `vipo_trl.data.DataOptions`; `PolyDPOConfig.data_options()` gives the trainer's).

    Rows the trainer would skip (ties, undecodable or identical images, ...) are skipped here too; those found while
    decoding are counted by reason in `skipped_rows`. Writes `diagnosis.json`, `diagnosis.txt` and `diagnosis.png`
    to `output_dir` when given.
    """
    from ..data import DataOptions, pairs_from_options
    from ..data.preference import decoded_pairs

    scorers = resolve_scorers(scorers, **({"device": device} if device else {}))
    pairs = pairs_from_options(dataset, options or DataOptions(), 1)
    chosen, rejected, prompts, categories = [], [], [], []
    skipped: Counter[str] = Counter()
    for item in decoded_pairs(pairs):
        if isinstance(item, str):
            skipped[item] += 1
            continue
        chosen.append(_first_frame(item["chosen"]))
        rejected.append(_first_frame(item["rejected"]))
        prompts.append(item["prompt"])
        categories.append(item.get("category"))
        if max_pairs is not None and len(prompts) >= max_pairs:
            break
    if not prompts:
        raise ValueError("the dataset has no usable pairs to diagnose (every row was a tie or unreadable).")
    has_categories = any(c is not None for c in categories)
    report = summarize(
        pair_scores(scorers, chosen, rejected, prompts, prompt_shuffles, options.seed if options else 0),
        categories if has_categories else None,
        easy_relevance,
    )
    report.skipped_rows = dict(skipped)
    if output_dir is not None:
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "diagnosis.json").write_text(json.dumps(report.to_dict(), indent=2))
        (out / "diagnosis.txt").write_text(str(report) + "\n")
        plot_diagnosis(report, out / "diagnosis.png")
    return report


def plot_diagnosis(report: Diagnosis, path: Path) -> None:
    """Stacked bars per scorer (agree / tie / disagree) and the all-scorer consistency and easy share."""
    plt = pyplot_or_none(path.name)
    if plt is None:
        return

    names = list(report.scorers)
    agree = [report.scorers[n].agree for n in names]
    tie = [report.scorers[n].tie for n in names]
    disagree = [report.scorers[n].disagree for n in names]
    fig, ax = plt.subplots(figsize=(1.6 * len(names) + 3.5, 3.4))
    ax.bar(names, agree, color="#3b7dd8", label="agrees with label")
    ax.bar(names, tie, bottom=agree, color="#cccccc", label="tie")
    ax.bar(names, disagree, bottom=[a + t for a, t in zip(agree, tie)], color="#d8553b", label="disagrees")
    ax.bar(["all agree"], [report.consistency], color="#2a9d5c", label="consistency")
    ax.bar(["easy"], [report.easy_share], color="#8e6bbf", label="easy share")
    ax.set_ylim(0, 1)
    ax.set_title(f"{report.pairs} pairs; suggested alpha {report.suggested_alpha:+.2f}", fontsize=9)
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _first_frame(media: Any) -> Any:
    # Videos are scored on their first frame: the image scorers judge one picture.
    return media[0] if isinstance(media, list) else media
