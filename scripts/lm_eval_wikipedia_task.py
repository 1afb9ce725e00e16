"""Write an lm-evaluation-harness task over this project's held-out Wikipedia text (no hub access).

    python scripts/lm_eval_wikipedia_task.py ./lm-eval-tasks [--docs 64]

Then ``--include_path ./lm-eval-tasks --tasks cospadi_wikipedia``: rolling log-likelihood over the
evaluation split (the text the quality benchmark scores), cut into documents of ~2000 characters;
lm-eval reports word / byte perplexity and bits per byte.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from offline_compress import assets  # noqa: E402

TASK = """task: cospadi_wikipedia
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="directory for the task YAML and its data")
    parser.add_argument("--docs", type=int, default=64, help="number of ~2000-character documents (default 64)")
    args = parser.parse_args()
    text = assets.wikipedia_split("evaluation")
    step = max(2000, len(text) // args.docs)
    docs = [text[i : i + 2000] for i in range(0, len(text), step)][: args.docs]
    args.out.mkdir(parents=True, exist_ok=True)
    data = (args.out / "cospadi_wikipedia.jsonl").resolve()
    data.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    (args.out / "cospadi_wikipedia.yaml").write_text(TASK.format(data=data))
    print(f"wrote {args.out / 'cospadi_wikipedia.yaml'} ({len(docs)} documents)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
