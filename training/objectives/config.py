"""Config section `loss`: the contrastive loss and the Text Concept-Consistency loss."""

from __future__ import annotations

from dataclasses import dataclass

CC_MAPS = ("attention", "relative")
CC_TARGETS = ("isolated", "towers")
CC_FORMS = ("l1", "spatial")


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
    cc_target: str = "isolated"
    """What each phrase's in-context map is pulled towards. `isolated` (the paper): the fusion head's map of the phrase
    encoded alone. `towers` (a departure): the towers' own phrase map, the softmax over patches of the cosine between
    each projected patch token and the phrase's CLIP text embedding at `cc_temperature` (the eval's `tower` map),
    computed by a frozen copy of the towers the run started from (`model.weights_file` or `model.pretrained`)."""
    cc_form: str = "l1"
    """How a map is compared with its target. `l1` (the paper): mean over patches of ReLU(|ctx - target| - epsilon);
    a `towers` target is first scaled to the in-context map's own mass, so only where the mass sits differs. `spatial`
    (a departure): KL(target || ctx), both normalised over patches, so only where the attention goes counts and each
    patch's gradient is weighted by the target's mass there."""
    cc_temperature: float = 0.1
    """Softmax temperature over patches of the towers' cosines, for the `towers` target and `lambda_grounding`
    (0.1: the eval's tower map, `pretrain.map_temperature`'s default)."""
    lambda_grounding: float = 0.0
    """Weight of the grounding-preservation term (a departure, off by default): KL(starting towers' phrase map ||
    training towers' phrase map), both at `cc_temperature`, which keeps fine-tuning from erasing the towers' own
    grounding. Its gradient reaches only the towers."""
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
        if self.cc_target not in CC_TARGETS:
            raise ValueError(f"loss.cc_target={self.cc_target!r} must be one of {', '.join(CC_TARGETS)}")
        if self.cc_form not in CC_FORMS:
            raise ValueError(f"loss.cc_form={self.cc_form!r} must be one of {', '.join(CC_FORMS)}")
        if self.cc_maps == "relative" and (self.cc_form, self.cc_target) != ("l1", "isolated"):
            raise ValueError(
                "loss.cc_maps=relative applies to the paper's loss (loss.cc_form=l1, loss.cc_target=isolated) only; "
                "loss.cc_form=spatial compares maps normalised over patches already"
            )
        if self.lambda_cc < 0 or self.cc_epsilon < 0 or self.lambda_grounding < 0:
            raise ValueError("loss.lambda_cc, loss.cc_epsilon and loss.lambda_grounding must be >= 0")
        if self.cc_temperature <= 0:
            raise ValueError("loss.cc_temperature must be positive")

    @property
    def needs_starting_towers(self) -> bool:
        """A frozen copy of the starting towers serves a `towers` target or the grounding-preservation term."""
        return (self.lambda_cc > 0 and self.cc_target == "towers") or self.lambda_grounding > 0
