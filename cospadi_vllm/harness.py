"""lm-evaluation-harness on CoSpaDi checkpoints: ``python -m cospadi_vllm.harness <lm_eval arguments>``.

The same as lm-eval's own ``lm_eval`` command, after ``import cospadi_vllm`` has registered the
``cospadi`` quantizer with transformers, so ``--model hf --model_args pretrained=CHECKPOINT`` loads the
checkpoint as stored (README, "Evaluate with transformers"). Needs ``pip install lm-eval``.
"""

from __future__ import annotations

import sys

import cospadi_vllm  # noqa: F401  (registers the cospadi quantizer with transformers)


def main() -> int:
    try:
        from lm_eval.__main__ import cli_evaluate
    except ImportError:
        print("cospadi_vllm.harness: error: lm-evaluation-harness is not installed (pip install lm-eval)",
              file=sys.stderr)
        return 2
    sys.argv[0] = "lm_eval"
    cli_evaluate()
    return 0


if __name__ == "__main__":
    sys.exit(main())
