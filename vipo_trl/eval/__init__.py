"""Evaluation: reward scorers (images, videos, a pairwise judge), base-versus-aligned win rates, the preference-set
diagnosis that suggests alpha, `make_pairs`, which makes a preference set from a model's own samples, and
`rescore_pairs`, which judges an existing set's pairs again (keeping or replacing its labels)."""

from ..data.prompts import BUILTIN_CATEGORIES, load_prompt_set
from .diagnose import (
    MEASURED_SETS,
    Diagnosis,
    MeasuredSet,
    ScorerAgreement,
    diagnose,
    paper_alpha,
    suggest_alpha,
    summarize,
)
from .evaluate import (
    BUILTIN_PROMPTS,
    EvalResult,
    RewardEvalCallback,
    evaluate_alignment,
    generate_images,
    load_prompts,
)
from .judge import ASPECTS, PairwiseScorer, VLMJudge, order_consistent_verdict
from .pairs import PairsResult, finish_pairs, make_pairs
from .rescore import rescore_pairs
from .scorers import (
    RewardScorer,
    available_scorers,
    convert_imagereward_state_dict,
    convert_open_clip_state_dict,
    get_scorer,
    register_scorer,
)
from .stats import MeanInterval, WinRate, mean_interval, t_quantile, win_rate
from .video_scorers import FrameAveragedScorer, TemporalConsistencyScorer, for_videos, sample_frames

__all__ = [
    "ASPECTS",
    "BUILTIN_CATEGORIES",
    "FrameAveragedScorer",
    "PairsResult",
    "PairwiseScorer",
    "TemporalConsistencyScorer",
    "VLMJudge",
    "finish_pairs",
    "for_videos",
    "load_prompt_set",
    "make_pairs",
    "rescore_pairs",
    "order_consistent_verdict",
    "sample_frames",
    "BUILTIN_PROMPTS",
    "Diagnosis",
    "MEASURED_SETS",
    "MeasuredSet",
    "EvalResult",
    "MeanInterval",
    "RewardEvalCallback",
    "RewardScorer",
    "ScorerAgreement",
    "WinRate",
    "available_scorers",
    "convert_imagereward_state_dict",
    "convert_open_clip_state_dict",
    "diagnose",
    "evaluate_alignment",
    "generate_images",
    "get_scorer",
    "load_prompts",
    "mean_interval",
    "paper_alpha",
    "register_scorer",
    "suggest_alpha",
    "summarize",
    "t_quantile",
    "win_rate",
]
