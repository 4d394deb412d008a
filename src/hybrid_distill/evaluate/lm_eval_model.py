"""The lm-eval model type `hybrid`: lm-eval's HF wrapper around a checkpoint loaded by our own loader.

HFLM does all the batching, padding and `generate` calls; we only hand it a model that HF's `from_pretrained`
could not build (linear mixers in some layers). `generate` runs with use_cache=True, and the mixers keep their
recurrent state in that cache, so decoding is O(1) per token in the linear layers. Registration happens on
import; lm-eval 0.4.13 discovers no third-party models by entry point, so the command line goes through
`python -m hybrid_distill.evaluate.lm_eval_cli` (see there).
"""
from __future__ import annotations

from pathlib import Path

from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from hybrid_distill.evaluate.loading import load_evaluation_tokenizer, load_for_evaluation

MODEL_TYPE = "hybrid"


@register_model(MODEL_TYPE)
class HybridLM(HFLM):
    """`--model hybrid --model_args path=DIR[,dtype=auto|float32|bfloat16][,device=cuda][,max_length=N]`.

    DIR is a hybrid checkpoint (config.json with a `hybrid` section) or a plain teacher saved with
    save_pretrained; either way its tokenizer is read from DIR.
    """

    def __init__(self, path: str, dtype: str = "auto", device: str | None = None, batch_size: int | str = 1,
                 max_length: int | None = None, **hflm_options):
        tokenizer = load_evaluation_tokenizer(path)
        model = load_for_evaluation(path, dtype=dtype, device=device)
        super().__init__(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length,
                         **hflm_options)
        self.checkpoint_path = str(Path(path).resolve())

    def get_model_info(self) -> dict:
        """What results["config"] records: HFLM's version would ask the Hub about a model object."""
        hybrid = getattr(self.model.config, "hybrid", None) or {}
        return {
            "model_path": self.checkpoint_path,
            "model_num_parameters": self.model.num_parameters(),
            "model_dtype": str(self.model.dtype),
            "softmax_layers": hybrid.get("softmax_layers"),
            "mixer": (hybrid.get("mixer") or {}).get("kind"),
        }
