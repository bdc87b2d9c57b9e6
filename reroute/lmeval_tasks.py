"""lm-evaluation-harness task files (YAML over a local JSONL file), shared by the testbed's tasks
(:func:`reroute.lmeval.write_testbed_tasks`) and the real benchmarks' (:func:`reroute.benchmarks.write_tasks`).

Kept apart from :mod:`reroute.lmeval` so that writing tasks needs no ``lm_eval`` install.
"""

from __future__ import annotations

import json
from pathlib import Path

_HEADER = """\
task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
doc_to_text: "{{{{prompt}}}}"
target_delimiter: ""
"""
_BODIES = {
    "mc": """\
output_type: multiple_choice
doc_to_choice: "{{choices}}"
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
""",
    # generation stops at the first line break: ``reroute eval --mode gen`` scores the first line only
    "gen": """\
output_type: generate_until
doc_to_target: "{{answer | trim}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: {max_gen_toks}
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
""",
    "sc": """\
output_type: generate_until
doc_to_target: "{{answer | trim}}"
repeats: {repeats}
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: {max_gen_toks}
  do_sample: true
  temperature: 1.0
filter_list:
  - name: maj@{repeats}
    filter:
      - function: majority_vote
      - function: take_first
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
""",
}
TASK_KINDS = tuple(_BODIES)


def task_yaml(name: str, data: str | Path, kind: str, max_gen_toks: int = 4, repeats: int = 1) -> str:
    """The YAML of task ``name`` over the JSONL file ``data`` (items with ``prompt`` and ``choices``/``label`` or
    ``answer``): ``kind`` ``"mc"`` (accuracy of the log-likelihood choice), ``"gen"`` (greedy generation to the
    first line break, exact match) or ``"sc"`` (``repeats`` sampled answers, majority vote)."""
    if kind not in _BODIES:
        raise ValueError(f"task kind must be one of {TASK_KINDS}, got {kind!r}")
    body = _BODIES[kind].replace("{max_gen_toks}", str(max_gen_toks)).replace("{repeats}", str(repeats))
    return _HEADER.format(name=name, data=json.dumps(str(Path(data).resolve()))) + body
