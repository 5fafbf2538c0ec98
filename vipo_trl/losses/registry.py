"""The loss registry: names -> preference losses over per-sample denoising errors."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any

import torch

from ..utils import Registry, did_you_mean

__all__ = [
    "DenoisingErrors",
    "LossOutput",
    "LossSpec",
    "available_losses",
    "get_loss",
    "register_loss",
]


@dataclass
class DenoisingErrors:
    """Per-sample denoising errors of one batch of preference pairs.

    Each tensor has shape `[B]` and holds the mean squared error of a network's prediction against its
    target (noise, velocity or flow), averaged over every non-batch dimension. Chosen and rejected of a
    pair share one noise sample and one timestep, so their errors are directly comparable.

    The `ref_*` fields are `None` when no selected loss needs a reference model: the trainer then skips
    the reference forward altogether. `policy_rejected` is `None` when no selected loss reads the rejected sample
    (e.g. `sft` alone): the rejected image is then neither encoded nor run.
    """

    policy_chosen: torch.Tensor
    policy_rejected: torch.Tensor | None = None
    ref_chosen: torch.Tensor | None = None
    ref_rejected: torch.Tensor | None = None

    @property
    def has_reference(self) -> bool:
        return self.ref_chosen is not None and self.ref_rejected is not None


@dataclass
class LossOutput:
    """What a loss returns: a scalar `loss` to minimise and `metrics` to log (floats or tensors)."""

    loss: torch.Tensor
    metrics: dict[str, Any] = field(default_factory=dict)


LossFn = Callable[..., LossOutput]


@dataclass(frozen=True)
class LossSpec:
    """A registered loss: call it as `spec(errors, config) -> LossOutput`.

    `needs_reference` says whether it reads the reference model's errors, `needs_rejected` whether it reads the
    rejected sample's (the trainer skips what no selected loss reads). `params`, when set, is a dataclass of the
    loss's own parameters: their values come from `config.loss_params[name]` (defaults where not given) and reach
    the function as a third argument, so a new loss needs no new config field.
    """

    name: str
    fn: LossFn
    needs_reference: bool
    params: type | None = None
    needs_rejected: bool = True

    def __call__(self, errors: DenoisingErrors, config: Any) -> LossOutput:
        if self.params is None:
            return self.fn(errors, config)
        return self.fn(errors, config, self.resolve_params(getattr(config, "loss_params", None)))

    def resolve_params(self, loss_params: dict[str, dict[str, Any]] | None) -> Any:
        """This loss's parameter dataclass filled from `loss_params[name]`; an unknown key is an error naming it."""
        given = dict((loss_params or {}).get(self.name) or {})
        if self.params is None:
            if given:
                raise ValueError(f"loss_params[{self.name!r}]={given}: the loss {self.name!r} takes no parameters.")
            return None
        valid = {f.name for f in fields(self.params)}
        for key in given:
            if key not in valid:
                raise ValueError(
                    f"loss_params[{self.name!r}] has no parameter {key!r}.{did_you_mean(key, valid)} "
                    f"{self.name} takes: {', '.join(sorted(valid)) or 'none'}."
                )
        return self.params(**given)


_REGISTRY: Registry[LossSpec] = Registry("loss")


def register_loss(
    name: str,
    *,
    needs_reference: bool,
    needs_rejected: bool = True,
    params: type | None = None,
    override: bool = False,
) -> Callable[[LossFn], LossFn]:
    """Register a preference loss under `name`; use as a decorator.

    ```python
    from dataclasses import dataclass

    from vipo_trl.losses import LossOutput, preference_logits, register_loss

    @dataclass
    class HingeParams:
        margin: float = 1.0

    @register_loss("my_hinge", needs_reference=True, params=HingeParams)
    def my_hinge(errors, config, params):
        return LossOutput(loss=torch.relu(params.margin - preference_logits(errors, config.beta)).mean())

    PolyDPOConfig(..., loss_type="my_hinge", loss_params={"my_hinge": {"margin": 2.0}})
    ```

    Args:
        name: the value users put in `PolyDPOConfig.loss_type`.
        needs_reference: whether the loss reads `errors.ref_chosen`/`errors.ref_rejected`. A loss registered
            with `False` gets `None` there, and the trainer makes no reference forward for it.
        needs_rejected: whether the loss reads the rejected sample's errors. When no selected loss does, the
            trainer neither encodes nor runs the rejected image and `errors.policy_rejected` is `None`.
        params: a dataclass of the loss's own parameters (see `LossSpec`); the function then takes
            `(errors, config, params)`.
        override: replace an existing loss of the same name instead of raising.
    """
    if params is not None and not is_dataclass(params):
        raise TypeError(f"register_loss({name!r}, params=...) needs a dataclass type, got {params!r}.")

    def decorator(fn: LossFn) -> LossFn:
        _REGISTRY.register(name, LossSpec(name, fn, needs_reference, params, needs_rejected), override=override)
        return fn

    return decorator


def get_loss(name: str) -> LossSpec:
    """The registered loss `name`, callable as `get_loss(name)(errors, config) -> LossOutput`; an unknown name raises
    a `ValueError` with the closest name and the list."""
    return _REGISTRY.get(name)


def available_losses() -> list[str]:
    """Names of every registered loss, sorted."""
    return _REGISTRY.names()
