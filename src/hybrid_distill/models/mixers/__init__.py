"""Linear mixers that replace softmax attention: Gated DeltaNet (`gdn`) and GLA (`gla`)."""
from .base import LinearMixer
from .gdn import GatedDeltaNetMixer
from .gla import GatedLinearAttentionMixer
from .spec import MIXER_KINDS, MixerSpec

MIXER_CLASSES = {"gdn": GatedDeltaNetMixer, "gla": GatedLinearAttentionMixer}


def make_mixer(spec: MixerSpec, layer_idx: int) -> LinearMixer:
    return MIXER_CLASSES[spec.kind](spec, layer_idx)


__all__ = ["LinearMixer", "MixerSpec", "MIXER_KINDS", "make_mixer"]
