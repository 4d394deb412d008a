"""Hyperparameters of a linear mixer, as stored in a hybrid checkpoint's config.json."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

MIXER_KINDS = ("gdn", "gla")


@dataclass
class MixerSpec:
    """Shape and options of one linear mixer; head layout mirrors the teacher's query heads."""

    kind: str
    hidden_size: int
    num_heads: int
    head_dim: int
    qkv_bias: bool = False
    use_short_conv: bool = True
    conv_size: int = 4
    use_output_gate: bool = False
    norm_eps: float = 1e-5
    allow_neg_eigval: bool = False      # GDN: beta in (0, 2) instead of (0, 1)
    gate_low_rank_dim: int = 16         # GLA: rank of the decay projection
    gate_logit_normalizer: float = 16.0  # GLA: log-decay = logsigmoid(x) / normalizer
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.kind not in MIXER_KINDS:
            raise ValueError(f"unknown mixer {self.kind!r}; supported: {', '.join(MIXER_KINDS)}")

    def to_dict(self) -> dict:
        return asdict(self)
