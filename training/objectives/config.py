"""Config section `loss`: the contrastive loss and the Text Concept-Consistency loss."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class LossConfig:
    """Contrastive loss plus the Text Concept-Consistency loss."""

    temperature: float = 0.07
    """Softmax temperature tau of the contrastive loss."""
    lambda_cc: float = 0.08
    """Weight of the Text-CC loss in the total."""
    cc_epsilon: float = 0.05
    """Slack of the Text-CC loss: ReLU(|ctx - iso| - epsilon)."""
    reference_negatives: bool = True
    """Score queries against the gathered reference images too (hard negatives, never positives)."""
    symmetric: bool = True
    """Add the target -> query contrastive term."""

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ValueError("loss.temperature must be positive")
        if self.lambda_cc < 0 or self.cc_epsilon < 0:
            raise ValueError("loss.lambda_cc and loss.cc_epsilon must be >= 0")
