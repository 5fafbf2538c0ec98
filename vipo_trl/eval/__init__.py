"""Evaluation: reward scorers, base-versus-aligned win rates, and the preference-set diagnosis that suggests alpha."""

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
from .scorers import (
    RewardScorer,
    available_scorers,
    convert_imagereward_state_dict,
    convert_open_clip_state_dict,
    get_scorer,
    register_scorer,
)
from .stats import MeanInterval, WinRate, mean_interval, t_quantile, win_rate

__all__ = [
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
