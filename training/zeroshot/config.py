"""Config section `methods`: the methods beside ConText-CIR, what each trains on and how each is scored."""

from __future__ import annotations

from dataclasses import dataclass, field

from training.zeroshot.cvsi_config import CVSIConfig

PHI_OBJECTIVES = ("image", "text")
RELEASED_PHI = ("searle", "lincir")
TISCIR_STAGES = ("msmp", "fgia")


@dataclass
class PhiConfig:
    """Textual inversion: phi maps a CLIP embedding to one pseudo-word token (SEARLE / LinCIR)."""

    objective: str = "image"
    """What phi trains from (`train.objective: phi`). `image` (SEARLE): the sentence `train_template` with the
    image's pseudo-word should embed like the image, plus `reg_weight` x a pull towards the sentence with the nearest
    real concept word. `text` (LinCIR): each caption's noun phrases are replaced by the pseudo-word phi makes from the
    caption's own embedding plus noise, and the sentence should still embed like the caption."""
    hidden_dim: int = 0
    """Width of phi's two hidden layers; 0: 4 x the embedding width (SEARLE's 768 -> 3072 -> 768 on ViT-L)."""
    dropout: float = 0.5
    normalise_input: bool = True
    """Feed phi the L2-normalised CLIP embedding (this system's phi). SEARLE's and LinCIR's released phi read the
    raw embedding: `released_weights` sets this from the release."""
    template: str = "a photo of $ that {caption}"
    """The query: `$` holds the reference image's pseudo-word, `{caption}` the modification text."""
    train_template: str = "a photo of $"
    """`image` objective: the sentence whose embedding should match the image's."""
    temperature: float = 0.25
    """`image` objective: softmax temperature of the contrastive term between pseudo-sentences and images."""
    reg_weight: float = 0.5
    """`image` objective: weight of the cosine pull towards "a photo of <nearest concept>"."""
    concepts: list[str] = field(default_factory=list)
    """`image` objective: the real words the regulariser may pull towards (a class vocabulary); empty: none."""
    noise_std: float = 0.5
    """`text` objective: the caption embedding gets Gaussian noise of a per-sample scale drawn from U(0, noise_std)
    times the embedding's own norm (LinCIR's noise bridges the text and image embeddings at query time)."""
    checkpoint: str | None = None
    """Eval: the phi run's checkpoint (a directory or `<run>/checkpoints/latest`) whose towers and phi are scored."""
    released_weights: str | None = None
    """Eval: a phi state dict as SEARLE or LinCIR release it, scored on the towers of `model` instead."""
    released_format: str = "searle"

    def __post_init__(self) -> None:
        if self.objective not in PHI_OBJECTIVES:
            raise ValueError(f"methods.phi.objective={self.objective!r} must be one of {PHI_OBJECTIVES}")
        if self.released_format not in RELEASED_PHI:
            raise ValueError(f"methods.phi.released_format={self.released_format!r} must be one of {RELEASED_PHI}")
        if self.template.count("$") != 1 or "{caption}" not in self.template:
            raise ValueError("methods.phi.template must hold one `$` and `{caption}`")
        if self.train_template.count("$") != 1:
            raise ValueError("methods.phi.train_template must hold one `$`")
        if self.temperature <= 0 or self.noise_std < 0 or self.reg_weight < 0 or not 0 <= self.dropout < 1:
            raise ValueError("methods.phi: temperature > 0, noise_std >= 0, reg_weight >= 0 and dropout in [0, 1)")


@dataclass
class TisCIRConfig:
    """TisCIR: MSMP (three MLPs making the pseudo-words of a structured template) and FGIA (attention over each
    image's own tokens). Trained in two stages of `train.objective: tiscir`."""

    stage: str = "msmp"
    """`msmp`: the three MLPs learn from noisy caption embeddings to rebuild the caption's embedding through
    `template`. `fgia`: MSMP frozen (start from the msmp run with `model.init_from`), FGIA learns on triplets so that
    image_weight x refined reference + text_weight x MSMP text part retrieves the target."""
    template: str = "a photo of $ , $ , $"
    """The structured template: one `$` per MLP (objects, attributes, the rest of the scene)."""
    hidden_mult: int = 4
    """Hidden width of each MLP as a multiple of the embedding width (768 -> 3072 -> 768 on ViT-L)."""
    dropout: float = 0.5
    noise_std: float = 0.5
    """MSMP: per-sample noise scale drawn from U(0, noise_std), times the embedding's norm."""
    fgia_heads: int = 4
    temperature: float = 0.07
    """FGIA: softmax temperature of the query -> target contrastive term (negatives over every rank)."""
    image_weight: float = 0.34
    text_weight: float = 0.66
    """Retrieval mixes the normalised image and text parts with these weights (the release's 0.34 / 0.66)."""
    checkpoint: str | None = None
    """Eval: the fgia run's checkpoint whose towers, MSMP and FGIA are scored."""

    def __post_init__(self) -> None:
        if self.stage not in TISCIR_STAGES:
            raise ValueError(f"methods.tiscir.stage={self.stage!r} must be one of {TISCIR_STAGES}")
        if self.template.count("$") != 3:
            raise ValueError("methods.tiscir.template must hold three `$`, one per MLP")
        if self.hidden_mult < 1 or self.fgia_heads < 1 or self.temperature <= 0 or not 0 <= self.dropout < 1:
            raise ValueError("methods.tiscir: hidden_mult >= 1, fgia_heads >= 1, temperature > 0, dropout in [0, 1)")
        if min(self.image_weight, self.text_weight) < 0 or self.image_weight + self.text_weight <= 0:
            raise ValueError("methods.tiscir.image_weight and text_weight must be >= 0 and not both 0")


@dataclass
class MethodsConfig:
    """The other methods' settings; each is trained by `train.objective: <name>` and scored by
    `launch/eval.py --methods ...`."""

    phi: PhiConfig = field(default_factory=PhiConfig)
    cvsi: CVSIConfig = field(default_factory=CVSIConfig)
    tiscir: TisCIRConfig = field(default_factory=TisCIRConfig)
