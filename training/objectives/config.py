"""Config section `loss`: the contrastive loss and the Text Concept-Consistency loss."""

from __future__ import annotations

from dataclasses import dataclass

CC_MAPS = ("attention", "relative")


@dataclass
class LossConfig:
    """Contrastive loss plus the Text Concept-Consistency loss."""

    temperature: float = 0.07
    """Softmax temperature tau of the contrastive loss (the initial value when `learnable_temperature`)."""
    learnable_temperature: bool = False
    """Learn tau as CLIP does: a log-scale parameter log(1/tau) of the loss module, optimized and checkpointed with
    the rest, its scale 1/tau clamped to [1, 100]. False keeps tau fixed at `temperature`."""
    lambda_cc: float = 0.08
    """Weight of the Text-CC loss in the total."""
    cc_epsilon: float = 0.05
    """Slack of the Text-CC loss: ReLU(|ctx - iso| - epsilon)."""
    cc_maps: str = "attention"
    """What Text-CC compares. `attention` (the paper and its released code): the maps as they are, the attention a
    patch pays to the phrase's tokens. `relative` (a diagnostic departure, not the paper's loss): each map divided by
    its mean over patches, so that only where the attention goes is compared and not how much of it the phrase gets
    (a phrase read alone always gets more; see `concept_consistency_parts`). Epsilon is then a share of the mean."""
    reference_negatives: bool = True
    """Score queries against the gathered reference images too (hard negatives, never positives)."""
    symmetric: bool = True
    """Add the target -> query contrastive term."""

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ValueError("loss.temperature must be positive")
        if self.learnable_temperature and not 0.01 <= self.temperature <= 1.0:
            raise ValueError(
                f"loss.temperature={self.temperature} must lie in [0.01, 1] with loss.learnable_temperature "
                "(its learned scale 1/temperature is clamped to [1, 100])"
            )
        if self.cc_maps not in CC_MAPS:
            raise ValueError(f"loss.cc_maps={self.cc_maps!r} must be one of {', '.join(CC_MAPS)}")
        if self.lambda_cc < 0 or self.cc_epsilon < 0:
            raise ValueError("loss.lambda_cc and loss.cc_epsilon must be >= 0")
