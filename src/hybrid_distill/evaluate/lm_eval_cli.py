"""lm-eval's own command line, with the `hybrid` model type registered first.

lm-eval 0.4.13 finds models only in its built-in table or among classes registered before it parses the
arguments (no entry-point group), so `lm_eval --model hybrid` alone cannot see ours. Use

    python -m hybrid_distill.evaluate.lm_eval_cli --model hybrid --model_args path=CHECKPOINT_DIR \
        --include_path RECALL_DIR/tasks --tasks hd_recall --batch_size 8

Every other lm-eval option works as documented by `lm_eval --help`.
"""
from __future__ import annotations

import hybrid_distill.evaluate.lm_eval_model  # noqa: F401  (registers the `hybrid` model type)


def main() -> None:
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
