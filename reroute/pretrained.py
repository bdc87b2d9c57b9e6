"""peft-style save / load of an adaptation: ``rm.save_pretrained(dir)`` and ``reroute.from_pretrained(model, dir)``.

A folder holds two files, as a peft adapter folder does:

- ``reroute_config.json`` (:class:`RerouteConfig`): format version, the model family, the architecture fingerprint
  the state fits, what is set per layer (offsets, per-row offsets, policies and the rows they apply to, masks,
  C3PO re-mixing) and, optionally, the hyperparameters of the method that produced it (a
  :class:`~reroute.C3POConfig`, :class:`~reroute.RerouterConfig` or :class:`~reroute.SCMoEConfig`, stored with
  its type name);
- ``routing_state.safetensors``: the tensors, keyed by decoder-layer index (``offsets.3``, ``row_offsets.3``,
  ``policy_rows.3``, ``mixing.3.experts`` / ``.logits`` / ``.positions``), so a state does not depend on module
  paths that change across transformers versions.

>>> rm.save_pretrained("adapted", method=c3po)          # or method=C3POConfig(...)
>>> rm = reroute.from_pretrained(model, "adapted")     # attach + load
>>> config = reroute.RerouteConfig.from_pretrained("adapted").method_config()   # C3POConfig(...)

Loading validates the whole folder before changing anything: a missing file, corrupted JSON or tensors, a state
saved for another architecture or a tensor of the wrong shape is an error that leaves the model's routing as it was.
Folders written by the older ``rm.save(dir)`` load too.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from reroute.routing.layer import Mixing
from reroute.routing.policy import ExpertMask, RoutingPolicy

if TYPE_CHECKING:
    from torch import nn

    from reroute.attach import RoutedModel

CONFIG_NAME = "reroute_config.json"
STATE_NAME = "routing_state.safetensors"
FORMAT = "reroute-pretrained"
FORMAT_VERSION = 1


def _method_config_types() -> dict[str, type]:
    """The method configs a folder may name, by type name (a closed set: loading never imports arbitrary code)."""
    from reroute.c3po.method import C3POConfig
    from reroute.rerouting.adapt import RerouterConfig
    from reroute.scmoe.config import SCMoEConfig

    return {cls.__name__: cls for cls in (C3POConfig, RerouterConfig, SCMoEConfig)}


def _jsonable(value: Any) -> Any:
    if isinstance(value, RoutingPolicy):
        return value.to_dict()
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot store a {type(value).__name__} in {CONFIG_NAME}")


def method_to_dict(method: Any) -> dict[str, Any]:
    """``{"type": "C3POConfig", "config": {...}}`` for a method config, or a method object holding one
    (``C3PO``, ``Rerouter``, ``SCMoE``: their ``.config``)."""
    config = getattr(method, "config", method)
    types = _method_config_types()
    if type(config).__name__ not in types or not isinstance(config, types[type(config).__name__]):
        names = ", ".join(types)
        raise TypeError(f"method must be one of {names} (or a method object holding one), got {type(method).__name__}")
    values = {f.name: _jsonable(getattr(config, f.name)) for f in dataclasses.fields(config)}
    return {"type": type(config).__name__, "config": values}


def method_from_dict(record: Mapping[str, Any]) -> Any:
    """The method config written by :func:`method_to_dict` (validated by the config's own checks)."""
    types = _method_config_types()
    if not isinstance(record, Mapping) or record.get("type") not in types or not isinstance(record.get("config"), dict):
        raise ValueError(f"method entry {record!r} is not one of {', '.join(types)} with a config dict")
    cls = types[record["type"]]
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(record["config"]) - set(known))
    if unknown:
        raise ValueError(f"{record['type']} has no fields {unknown} (saved by another reroute version?)")
    values = {}
    for name, value in record["config"].items():
        default = known[name].default
        values[name] = tuple(value) if isinstance(default, tuple) and isinstance(value, list) else value
    return cls(**values)


@dataclass
class RerouteConfig:
    """The JSON half of a saved adaptation (``reroute_config.json``).

    Attributes:
        family: ``model_type`` of the model family the state was saved from.
        fingerprint: what the model must match (:meth:`RoutedModel.fingerprint`).
        state: what is set, per decoder-layer index: ``offsets`` (layers with non-zero offsets), ``row_offsets``,
            ``policies`` (``{layer: policy dict}``), ``policy_rows`` (layers whose policy applies to some rows
            only), ``masks`` (``{layer: mask dict}``), ``mixing`` (layers with C3PO re-mixing).
        method: the producing method's config as ``{"type": ..., "config": {...}}``, or ``None``.
        format_version: version of this layout.
        reroute_version: the reroute that wrote it.
    """

    family: str
    fingerprint: dict[str, Any]
    state: dict[str, Any] = field(default_factory=dict)
    method: dict[str, Any] | None = None
    format_version: int = FORMAT_VERSION
    reroute_version: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, **dataclasses.asdict(self)}

    def method_config(self) -> Any:
        """The saved method config (a ``C3POConfig``, ``RerouterConfig`` or ``SCMoEConfig``), or ``None``."""
        return None if self.method is None else method_from_dict(self.method)

    def save_pretrained(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / CONFIG_NAME
        path.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
        return path

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> RerouteConfig:
        """Read and check ``directory/reroute_config.json``."""
        path = Path(directory) / CONFIG_NAME
        if not Path(directory).is_dir():
            raise FileNotFoundError(f"{directory} is not a folder")
        if not path.is_file():
            raise FileNotFoundError(f"{directory} holds no saved reroute state ({CONFIG_NAME} is missing)")
        try:
            record = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"{path} is not valid JSON: {exc}") from exc
        if not isinstance(record, dict) or record.get("format") != FORMAT:
            raise ValueError(f"{path} is not a reroute config (its 'format' is not {FORMAT!r})")
        version = record.get("format_version")
        if not isinstance(version, int) or version < 1:
            raise ValueError(f"{path} has no valid format_version")
        if version > FORMAT_VERSION:
            raise ValueError(f"{path} has format version {version}; this reroute reads up to {FORMAT_VERSION}")
        names = {f.name for f in dataclasses.fields(cls)}
        missing = sorted({"family", "fingerprint"} - set(record))
        if missing:
            raise ValueError(f"{path} lacks {missing}")
        if not isinstance(record["fingerprint"], dict) or not isinstance(record.get("state", {}), dict):
            raise ValueError(f"{path}: 'fingerprint' and 'state' must be JSON objects")
        config = cls(**{k: v for k, v in record.items() if k in names})
        if config.method is not None:
            method_from_dict(config.method)  # a clear error now rather than at method_config()
        return config


# ------------------------------------------------------------------------------------------------- save
def _tensor(value: torch.Tensor) -> torch.Tensor:
    """A CPU copy owning its memory (safetensors refuses tensors that share storage, e.g. views of one δ)."""
    return value.detach().to("cpu").clone().contiguous()


def save_pretrained(rm: RoutedModel, directory: str | Path, method: Any = None) -> Path:
    """Write ``rm``'s whole routing state (and optionally ``method``'s config) to ``directory``; returns it."""
    from safetensors.torch import save_file

    import reroute

    rm._check_attached()
    tensors: dict[str, torch.Tensor] = {}
    state: dict[str, Any] = {
        "offsets": [],
        "row_offsets": [],
        "policies": {},
        "policy_rows": [],
        "masks": {},
        "mixing": [],
    }
    for idx, layer in rm.layers.items():
        tensors[f"offsets.{idx}"] = _tensor(layer.offsets)
        if bool(layer.offsets.detach().ne(0).any()):
            state["offsets"].append(idx)
        if layer.row_offsets is not None:
            tensors[f"row_offsets.{idx}"] = _tensor(layer.row_offsets)
            state["row_offsets"].append(idx)
        if layer.policy is not None:
            state["policies"][str(idx)] = layer.policy.to_dict()
            if layer.policy_rows is not None:
                tensors[f"policy_rows.{idx}"] = _tensor(layer.policy_rows)
                state["policy_rows"].append(idx)
        if layer.mask is not None:
            state["masks"][str(idx)] = layer.mask.to_dict()
        if layer.mixing is not None:
            for name in ("experts", "logits", "positions"):
                tensors[f"mixing.{idx}.{name}"] = _tensor(getattr(layer.mixing, name))
            state["mixing"].append(idx)
    config = RerouteConfig(
        family=rm.family.model_type,
        fingerprint=rm.fingerprint(),
        state=state,
        method=None if method is None else method_to_dict(method),
        reroute_version=reroute.__version__,
    )
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / STATE_NAME), metadata={"format": FORMAT})
    config.save_pretrained(directory)
    return directory


# ------------------------------------------------------------------------------------------------- load
def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise FileNotFoundError(f"{path.parent} lacks {STATE_NAME}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ValueError(f"{path} is not a readable safetensors file: {exc}") from exc


def _check_fingerprint(rm: RoutedModel, config: RerouteConfig, directory: Path) -> None:
    if config.family != rm.family.model_type:
        raise ValueError(
            f"the routing state in {directory} was saved for a {config.family!r} model; "
            f"this model is {rm.family.model_type!r} ({rm.family.display_name})"
        )
    mine = rm.fingerprint()
    if config.fingerprint != mine:
        diff = {k: (config.fingerprint.get(k), v) for k, v in mine.items() if config.fingerprint.get(k) != v}
        raise ValueError(f"the routing state in {directory} was saved for another architecture: (saved, this) = {diff}")


def _layer_list(state: Mapping[str, Any], key: str, rm: RoutedModel) -> list[int]:
    values = state.get(key, [])
    values = list(values) if isinstance(values, (list, dict)) else None
    if values is None or not all(str(v).lstrip("-").isdigit() for v in values):
        raise ValueError(f"state.{key} in {CONFIG_NAME} must list decoder-layer indices")
    layers = [int(v) for v in values]
    for idx in layers:
        if idx not in rm.layers:
            raise ValueError(f"state.{key} names layer {idx}, which is not an MoE layer ({rm.moe_layers})")
    return layers


def _need(tensors: Mapping[str, torch.Tensor], key: str, path: Path) -> torch.Tensor:
    if key not in tensors:
        raise ValueError(f"{path} lacks the tensor {key!r} that {CONFIG_NAME} announces")
    return tensors[key]


def _snapshot(rm: RoutedModel) -> list[tuple]:
    return [
        (layer, layer.offsets.detach().clone(), layer.row_offsets, layer.policy, layer.policy_rows, layer.mask,
         layer.mixing)
        for layer in rm.layers.values()
    ]  # fmt: skip


def _restore(snapshot: list[tuple]) -> None:
    for layer, offsets, row_offsets, policy, policy_rows, mask, mixing in snapshot:
        with torch.no_grad():
            layer.offsets.copy_(offsets)
        layer.row_offsets, layer.policy, layer.policy_rows = row_offsets, policy, policy_rows
        layer.mask, layer.mixing = mask, mixing


def load_pretrained(rm: RoutedModel, directory: str | Path) -> RoutedModel:
    """Replace ``rm``'s routing state by the one saved in ``directory`` (by :func:`save_pretrained`, or by the
    older ``rm.save``). All or nothing: on any error the routing state is left as it was."""
    from reroute.attach import CONFIG_FILE as LEGACY_CONFIG

    rm._check_attached()
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory} is not a folder")
    if not (directory / CONFIG_NAME).is_file() and (directory / LEGACY_CONFIG).is_file():
        return rm.load(directory)
    config = RerouteConfig.from_pretrained(directory)
    _check_fingerprint(rm, config, directory)
    state_path = directory / STATE_NAME
    tensors = _read_tensors(state_path)
    state = config.state
    offsets = {idx: _need(tensors, f"offsets.{idx}", state_path) for idx in rm.layers}
    offsets = {idx: t.to(device=rm.layers[idx].device, dtype=torch.float32) for idx, t in offsets.items()}
    rows = {
        idx: _need(tensors, f"row_offsets.{idx}", state_path).to(rm.layers[idx].device)
        for idx in _layer_list(state, "row_offsets", rm)
    }
    policy_rows = {
        idx: _need(tensors, f"policy_rows.{idx}", state_path) for idx in _layer_list(state, "policy_rows", rm)
    }
    policies, masks = {}, {}
    try:
        for idx in _layer_list(state, "policies", rm):
            policies[idx] = RoutingPolicy(**state["policies"][str(idx)])
        for idx in _layer_list(state, "masks", rm):
            masks[idx] = ExpertMask(**state["masks"][str(idx)])
    except TypeError as exc:
        raise ValueError(f"a policy or mask in {directory / CONFIG_NAME} is malformed: {exc}") from exc
    if set(policy_rows) - set(policies):
        raise ValueError(f"{CONFIG_NAME} lists policy rows for layers without a policy")
    mixing = {
        idx: Mixing(
            *(_need(tensors, f"mixing.{idx}.{name}", state_path) for name in ("experts", "logits", "positions"))
        )
        for idx in _layer_list(state, "mixing", rm)
    }
    snapshot = _snapshot(rm)
    try:
        rm.reset()
        rm.set_offsets(offsets)
        if rows:
            rm.set_row_offsets(rows)
        for idx, policy in policies.items():
            rm.set_policy(policy, layers=idx, rows=policy_rows.get(idx))
        for idx, mask in masks.items():
            rm.set_mask(mask, layers=idx)
        for idx, m in mixing.items():
            rm.set_mixing(idx, m.experts, m.positions, logits=m.logits.float().to(rm.layers[idx].device))
    except (ValueError, TypeError, KeyError) as exc:
        _restore(snapshot)
        raise ValueError(f"the routing state in {directory} does not fit this model: {exc}") from exc
    return rm


def from_pretrained(model: nn.Module, directory: str | Path) -> RoutedModel:
    """Attach routing control to ``model`` (a transformers MoE model, or a peft model wrapping one) and load the
    state saved in ``directory``. If this call attached the model and loading fails, the model is detached again."""
    from reroute.attach import _core_model, attach

    fresh = all(m.__dict__.get("_reroute_attached") is None for m in (model, _core_model(model)))
    rm = attach(model)
    try:
        return load_pretrained(rm, directory)
    except Exception:
        if fresh:
            rm.detach()
        raise
