"""The import direction: routing <- attach (with the save format) <- methods <- integrations."""

from __future__ import annotations

import json
import subprocess
import sys

LAYERS_BELOW_METHODS = {
    "reroute",
    "reroute.arch",
    "reroute.arch.families",
    "reroute.arch.rules",
    "reroute.attach",
    "reroute.compat",
    "reroute.kernels",
    "reroute.kernels.experts",
    "reroute.pretrained",
    "reroute.routing",
    "reroute.routing.checks",
    "reroute.routing.graph",
    "reroute.routing.layer",
    "reroute.routing.policy",
    "reroute.routing.replay",
    "reroute.routing.trace",
    "reroute.self_consistency",
    "reroute.testing",
}


def _loaded(code: str) -> set[str]:
    script = f"import json, sys\n{code}\nprint(json.dumps(sorted(m for m in sys.modules if m.startswith('reroute'))))"
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=True)
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def test_attach_save_and_load_import_no_method_and_no_integration(tmp_path):
    loaded = _loaded(
        "import torch\n"
        "from reroute.attach import attach\n"
        "from reroute.testing import tiny_model\n"
        "rm = attach(tiny_model('olmoe'))\n"
        "rm.set_row_offsets({rm.moe_layers[0]: torch.ones(2, rm.num_experts)})\n"
        f"rm.save_pretrained({str(tmp_path)!r})\n"
        f"rm.load_pretrained({str(tmp_path)!r})\n"
    )
    assert loaded <= LAYERS_BELOW_METHODS, sorted(loaded - LAYERS_BELOW_METHODS)


def test_import_reroute_is_lazy_and_public_names_still_resolve():
    assert _loaded("import reroute") <= LAYERS_BELOW_METHODS
    loaded = _loaded("import reroute\nreroute.SCMoE, reroute.available_methods()")
    assert {"reroute.scmoe.method", "reroute.methods.registry", "reroute.c3po.method"} <= loaded
    assert not {"reroute.lmeval", "reroute.cli", "reroute.eval"} & loaded


def test_method_folders_register_without_importing_integrations():
    loaded = _loaded("from reroute.methods import available_methods\navailable_methods()")
    assert not {m for m in loaded if m in ("reroute.lmeval", "reroute.cli") or m.startswith("reroute.eval")}
