"""Write ``examples/reroute_tour.ipynb`` (without outputs) from the cells below.

    python examples/make_notebook.py            # rewrite the notebook
    jupyter nbconvert --execute --to notebook examples/reroute_tour.ipynb   # run it

The notebook is generated, not edited by hand, so that it stays reviewable as code; ``tests/test_notebook.py``
checks that the committed file matches this script and executes it on the testbed model.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

NOTEBOOK = Path(__file__).resolve().parent / "reroute_tour.ipynb"
TEST_ITEMS = 32  # test_shift items per method: the whole notebook stays under a minute on two CPU cores
REFERENCE_ITEMS = 100  # reference items behind the per-domain view and C3PO's index

CELLS: list[tuple[str, str]] = [
    (
        "markdown",
        """# A tour of reroute on the testbed model

`reroute` adapts the expert routing of a transformers Mixture-of-Experts model at test time, without touching its
weights. This notebook runs on the small OLMoE-architecture testbed that ships with the package (no downloads, a CPU
is enough):

1. attach routing control to the model,
2. look at its routing: which experts each task domain uses, layer by layer,
3. adapt with C3PO and see where the routing changes,
4. run every method on the same slice of the shifted test split and compare accuracy.

Every figure comes from a function in `reroute.plot`; the cells only call them.""",
    ),
    (
        "code",
        """%matplotlib inline
import torch

import reroute
from reroute.c3po import ReferenceIndex
from reroute.eval import make_method, print_table, run_eval
from reroute.testbed import load_testbed, make_split

torch.set_num_threads(1)  # the testbed model is tiny: one thread is fastest, more only contend
torch.manual_seed(0)""",
    ),
    (
        "markdown",
        """## 1. Attach

`reroute.attach(model)` puts a routing controller on every MoE layer. With no state set, the model computes exactly
what it computed before; offsets, policies, masks and C3PO re-mixing are set on the returned `RoutedModel`.""",
    ),
    (
        "code",
        """model, tokenizer = load_testbed()
rm = reroute.attach(model)
rm""",
    ),
    (
        "markdown",
        """## 2. The task suite

Eight domains share one input format (a short list of numbers, then `=`) and answer with one number. A cue word
names the domain in the training and `reference` splits; `test_shift` removes it, so the model has to route from
the content alone — the setting where test-time routing adaptation should help.""",
    ),
    (
        "code",
        f"""test_items = make_split("test_shift", n={TEST_ITEMS})
reference_items = make_split("reference", n={REFERENCE_ITEMS})
for item in (reference_items[0], test_items[0]):
    print(f"{{item['split']:>10}} [{{item['domain']}}]  {{item['prompt']!r}} -> {{item['answer']!r}}")""",
    ),
    (
        "markdown",
        """## 3. Routing per domain

`reroute.plot.usage_by_group` runs the prompts of each domain and counts which experts they are routed to (share of
the layer's token × slot assignments). First the last MoE layer, then every layer at a glance.""",
    ),
    (
        "code",
        """by_domain = reroute.plot.usage_by_group(rm, tokenizer, reference_items, key="domain")
reroute.plot.domain_usage(by_domain, layer=rm.moe_layers[-1], layers=rm.moe_layers)""",
    ),
    (
        "code",
        """reroute.plot.domain_usage(by_domain, layers=rm.moe_layers)""",
    ),
    (
        "markdown",
        """## 4. Layer × expert usage

`rm.trace()` records every router call inside the block (logits, chosen experts, weights); the heatmap reads the
trace directly. `reroute.plot.prompt_usage` does the same over many prompts, in batches.""",
    ),
    (
        "code",
        """test_prompts = [item["prompt"] for item in test_items]
with torch.no_grad(), rm.trace() as trace:
    model(input_ids=tokenizer(test_prompts[0], return_tensors="pt")["input_ids"])
print("routing entropy per layer (nats):", [round(float(h), 2) for h in trace.entropy()])
reroute.plot.usage_heatmap(trace, title="one test_shift prompt")""",
    ),
    (
        "code",
        """base_usage = reroute.plot.prompt_usage(rm, tokenizer, test_prompts)
reroute.plot.usage_heatmap(base_usage, layers=rm.moe_layers, title=f"{len(test_prompts)} test_shift prompts")""",
    ),
    (
        "markdown",
        """## 5. C3PO: before and after

C3PO finds each test prompt's nearest successful neighbours in a reference index and re-mixes the routing weights of
the core experts in the last layers, at the last prompt token. A small index (the reference items the model answers
correctly) keeps this notebook fast. `adaptation_usage` counts expert usage at that token without and with the
adaptation, over the items C3PO adapted (`adapted_only=True`: where its gates abstain the routing stays the base one,
which would only dilute the change). Only the critical layers are shown, the ones C3PO re-mixes (the other layers do
not change at that token).

C3PO moves a part of each layer's routing mass, so the two usage maps on the right look alike at a glance; the large
left panel is the change itself, red where an expert is used more after adaptation, blue where less, and each layer
is labelled with the share of its assignments that moved to other experts.""",
    ),
    (
        "code",
        """index = ReferenceIndex.build(  # retrieve by the cue-free question, as a bag of tokens (see testbed NOTES.md)
    rm, tokenizer, reference_items, embedder="lexical", query_field="question", progress=False
)
c3po = reroute.C3PO(rm, index, tokenizer, surrogate="ngd")
adaptation = c3po.adapt(test_items)
print(
    f"index: {len(index)} reference items; C3PO kept the base routing for {int(adaptation.abstained.sum())} "
    f"of {len(test_items)} items"
)
before, after = reroute.plot.adaptation_usage(c3po, adaptation, test_prompts, adapted_only=True)
rows = [rm.moe_layers.index(layer) for layer in c3po.layers]  # the critical layers: the only ones C3PO changes
adapted = int((~adaptation.abstained).sum())
title = f"C3PO (NGD) at the last prompt token of the {adapted} adapted items (of {len(test_items)})"
reroute.plot.usage_difference(before[rows], after[rows], layers=c3po.layers, title=title)""",
    ),
    (
        "markdown",
        """## 6. Every method on the same items

Multiple choice by log-likelihood through the evaluation harness: the base model, C3PO (neighbourhood gradient
descent), continuous rerouting (router-logit offsets learned from the prompt itself), SCMoE (self-contrast with a
weak routing), and the oracle, which optimises each item's pathway on its own label — an upper bound, not a method.""",
    ),
    (
        "code",
        """methods = {
    "base": make_method("base"),
    "c3po (ngd)": make_method("c3po", index=index, surrogate="ngd"),
    "rerouting": make_method("rerouting"),
    "scmoe": make_method("scmoe"),
    "oracle": make_method("oracle"),
}
results = []
for label, method in methods.items():
    result = run_eval(rm, tokenizer, test_items, method, split="test_shift", mode="mc", progress=False)
    result.method = label
    results.append(result)
print_table(results, title=f"test_shift, first {len(test_items)} items, multiple choice")""",
    ),
    (
        "markdown",
        """## 7. Compare

Accuracy with 95% bootstrap intervals, then per domain with each domain's number of items `n` and 95% Wilson
intervals: with a few items per domain the intervals span most of the axis, so read the per-domain bars as a sketch.
The full evaluation is `reroute eval --method base,c3po,rerouting,scmoe,oracle --split test_shift`.""",
    ),
    (
        "code",
        """reroute.plot.accuracy_bars(results, title="test_shift accuracy (95% bootstrap intervals)")""",
    ),
    (
        "code",
        """reroute.plot.domain_accuracy(results, items=test_items)""",
    ),
    (
        "markdown",
        """Next: `rm.save_pretrained(folder, method=...)` stores routing state (offsets, policies, masks,
re-mixing) with the method's config, and `reroute.from_pretrained(model, folder)` attaches and loads it — also on a
peft-wrapped model.""",
    ),
]


def build() -> nbformat.NotebookNode:
    """The notebook, without outputs, with stable cell ids (so regenerating it changes nothing)."""
    cells = []
    for i, (kind, source) in enumerate(CELLS):
        cell = new_markdown_cell(source) if kind == "markdown" else new_code_cell(source)
        cell["id"] = f"cell-{i:02d}"
        cells.append(cell)
    notebook = new_notebook(cells=cells)
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    notebook.metadata["language_info"] = {"name": "python"}
    return notebook


def main() -> None:
    notebook = build()
    nbformat.validate(notebook)
    nbformat.write(notebook, NOTEBOOK)
    print(f"wrote {NOTEBOOK}")


if __name__ == "__main__":
    main()
