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

Saving is atomic: both files are written to a temporary folder that then replaces ``dir`` (the config also
records the SHA-256 of the tensors file, so a folder whose two files come from different saves is refused).
Loading validates the whole folder before changing anything: a missing file, corrupted JSON or tensors, a state
saved for another architecture or a tensor of the wrong shape or type is an error that leaves the model's routing
as it was. Folders written by the older ``rm.save(dir)`` (``routing_config.json``) load through
:func:`convert_legacy`; ``rm.save`` / ``rm.load`` are now deprecated aliases of these functions.

This module sits below :mod:`reroute.attach` (it never imports it): the state format depends on the routing layer
only. Naming a method config (``method=``) reads the method registry, the one place that knows the methods.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from reroute import __version__
from reroute.routing.checks import check_tensor
from reroute.routing.layer import Mixing
from reroute.routing.policy import ExpertMask, RoutingPolicy

if TYPE_CHECKING:
    from reroute.attach import RoutedModel

CONFIG_NAME = "reroute_config.json"
STATE_NAME = "routing_state.safetensors"
FORMAT = "reroute-pretrained"
FORMAT_VERSION = 1
LEGACY_CONFIG_NAME = "routing_config.json"
LEGACY_FORMAT = "reroute-routing-state"


def _method_config_types() -> dict[str, type]:
    """The method configs a folder may name, by type name: the registered ones (a closed set: loading never imports
    arbitrary code)."""
    from reroute.methods.registry import config_types

    return config_types()


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
        tensors_sha256: SHA-256 of ``routing_state.safetensors`` as written with this config (``None`` in folders
            from before it was recorded).
    """

    family: str
    fingerprint: dict[str, Any]
    state: dict[str, Any] = field(default_factory=dict)
    method: dict[str, Any] | None = None
    format_version: int = FORMAT_VERSION
    reroute_version: str = ""
    tensors_sha256: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, **dataclasses.asdict(self)}

    def method_config(self) -> Any:
        """The saved method config (a ``C3POConfig``, ``RerouterConfig`` or ``SCMoEConfig``), or ``None``."""
        return None if self.method is None else method_from_dict(self.method)

    def save_pretrained(self, directory: str | Path) -> Path:
        directory = _folder_for_writing(directory)
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
        record = _read_json(path)
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


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _folder_for_writing(directory: str | Path) -> Path:
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"cannot save the routing state to {directory}: it is a file; pass a folder path")
    return directory


def _state_of(rm: RoutedModel) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(state record, tensors)`` of ``rm``'s whole routing state."""
    tensors: dict[str, torch.Tensor] = {}
    state: dict[str, Any] = {"offsets": [], "row_offsets": [], "policies": {}, "policy_rows": [], "masks": {},
                             "mixing": []}  # fmt: skip
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
    return state, tensors


def save_pretrained(rm: RoutedModel, directory: str | Path, method: Any = None) -> Path:
    """Write ``rm``'s whole routing state (and optionally ``method``'s config) to ``directory``; returns it.

    Atomic: the files are written to a temporary folder beside ``directory`` which then replaces it (when
    ``directory`` holds other files too, they stay, and the two files are moved in one after the other; the
    recorded checksum makes a half-replaced pair an error at load time)."""
    from safetensors.torch import save_file

    rm._check_attached()
    directory = _folder_for_writing(directory)
    method_record = None if method is None else method_to_dict(method)  # a bad method fails before any write
    state, tensors = _state_of(rm)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".tmp", dir=directory.parent))
    try:
        save_file(tensors, str(staging / STATE_NAME), metadata={"format": FORMAT})
        config = RerouteConfig(
            family=rm.family.model_type,
            fingerprint=rm.fingerprint(),
            state=state,
            method=method_record,
            reroute_version=__version__,
            tensors_sha256=_sha256(staging / STATE_NAME),
        )
        config.save_pretrained(staging)
        _install(staging, directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return directory


def _install(staging: Path, directory: Path) -> None:
    """Move the written folder into place: one rename when ``directory`` holds nothing else."""
    ours = {CONFIG_NAME, STATE_NAME, LEGACY_CONFIG_NAME}
    if not directory.exists() or {p.name for p in directory.iterdir()} <= ours:
        old = None
        if directory.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".old", dir=directory.parent))
            os.replace(directory, old / "state")
        try:
            os.replace(staging, directory)
        except OSError:
            if old is not None:
                os.replace(old / "state", directory)
            raise
        finally:
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        return
    os.replace(staging / STATE_NAME, directory / STATE_NAME)
    os.replace(staging / CONFIG_NAME, directory / CONFIG_NAME)
    (directory / LEGACY_CONFIG_NAME).unlink(missing_ok=True)  # the older layout's config would shadow nothing now


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


def _read_json(path: Path) -> Any:
    """The JSON in ``path``; a clear error when it is not JSON."""
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from exc


def convert_legacy(directory: str | Path) -> tuple[RerouteConfig, dict[str, torch.Tensor]]:
    """Read a folder written by the older ``rm.save`` (``routing_config.json`` + ``routing_state.safetensors``:
    offsets, layer policies and masks) as this format's config and tensors. The one converter between the two."""
    directory = Path(directory)
    path = directory / LEGACY_CONFIG_NAME
    record = _read_json(path)
    if not isinstance(record, dict) or record.get("format") != LEGACY_FORMAT:
        raise ValueError(f"{path} is not a reroute routing state (its 'format' is not {LEGACY_FORMAT!r})")
    if not isinstance(record.get("version"), int) or record["version"] > 1:
        raise ValueError(f"{path} has format version {record.get('version')!r}; this reroute reads version 1")
    fingerprint = record.get("fingerprint")
    if not isinstance(fingerprint, dict) or not isinstance(fingerprint.get("model_type"), str):
        raise ValueError(f"{path} has no valid fingerprint")
    policies, masks = record.get("policies", {}), record.get("masks", {})
    if not isinstance(policies, dict) or not isinstance(masks, dict):
        raise ValueError(f"{path}: 'policies' and 'masks' must be JSON objects")
    tensors = _read_tensors(directory / STATE_NAME)
    offsets = sorted(int(k.split(".", 1)[1]) for k in tensors if k.startswith("offsets.") and k[8:].isdigit())
    state = {"offsets": offsets, "row_offsets": [], "policies": policies, "policy_rows": [], "masks": masks,
             "mixing": []}  # fmt: skip
    return RerouteConfig(family=fingerprint["model_type"], fingerprint=fingerprint, state=state), tensors


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
    if values is None or not all(isinstance(v, (int, str)) and str(v).lstrip("-").isdigit() for v in values):
        raise ValueError(f"state.{key} in {CONFIG_NAME} must list decoder-layer indices")
    layers = [int(v) for v in values]
    for idx in layers:
        if idx not in rm.layers:
            raise ValueError(f"state.{key} names layer {idx}, which is not an MoE layer ({rm.moe_layers})")
    return layers


def _need(tensors: Mapping[str, torch.Tensor], key: str, path: Path, kind: str) -> torch.Tensor:
    """The tensor ``key``, checked to be of ``kind``: ``"float"``, ``"int"`` or ``"index"`` (bool or integer)."""
    if key not in tensors:
        raise ValueError(f"{path} lacks the tensor {key!r} that {CONFIG_NAME} announces")
    return check_tensor(tensors[key], f"the tensor {key!r} in {path}", kind=kind, dtype_error=ValueError)


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


def read_pretrained(directory: str | Path) -> tuple[RerouteConfig, dict[str, torch.Tensor]]:
    """The config and tensors of a saved folder (either layout), checked against each other's checksum."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory} is not a folder")
    if not (directory / CONFIG_NAME).is_file() and (directory / LEGACY_CONFIG_NAME).is_file():
        return convert_legacy(directory)
    config = RerouteConfig.from_pretrained(directory)
    state_path = directory / STATE_NAME
    tensors = _read_tensors(state_path)
    if config.tensors_sha256 is not None and _sha256(state_path) != config.tensors_sha256:
        raise ValueError(
            f"{state_path} does not match {CONFIG_NAME} (its checksum differs: the two files come from different "
            "saves); save the state again"
        )
    return config, tensors


def load_pretrained(rm: RoutedModel, directory: str | Path) -> RoutedModel:
    """Replace ``rm``'s routing state by the one saved in ``directory`` (by :func:`save_pretrained`, or by the
    older ``rm.save``). All or nothing: on any error the routing state is left as it was."""
    rm._check_attached()
    directory = Path(directory)
    config, tensors = read_pretrained(directory)
    _check_fingerprint(rm, config, directory)
    state_path = directory / STATE_NAME
    state = config.state
    offsets = {idx: _need(tensors, f"offsets.{idx}", state_path, "float") for idx in rm.layers}
    offsets = {idx: t.to(device=rm.layers[idx].device, dtype=torch.float32) for idx, t in offsets.items()}
    rows = {
        idx: _need(tensors, f"row_offsets.{idx}", state_path, "float").to(rm.layers[idx].device)
        for idx in _layer_list(state, "row_offsets", rm)
    }
    policy_rows = {
        idx: _need(tensors, f"policy_rows.{idx}", state_path, "index") for idx in _layer_list(state, "policy_rows", rm)
    }
    policies, masks = {}, {}
    try:
        for idx in _layer_list(state, "policies", rm):
            policies[idx] = RoutingPolicy(**state["policies"][str(idx)])
        for idx in _layer_list(state, "masks", rm):
            masks[idx] = ExpertMask(**state["masks"][str(idx)])
    except (TypeError, KeyError, AttributeError) as exc:
        raise ValueError(f"a policy or mask in {directory / CONFIG_NAME} is malformed: {exc}") from exc
    if set(policy_rows) - set(policies):
        raise ValueError(f"{CONFIG_NAME} lists policy rows for layers without a policy")
    mixing = {}
    for idx in _layer_list(state, "mixing", rm):
        kinds = {"experts": "int", "logits": "float", "positions": "int"}
        parts = {name: _need(tensors, f"mixing.{idx}.{name}", state_path, kind) for name, kind in kinds.items()}
        if parts["experts"].dim() not in (1, 2) or parts["experts"].shape[-1] == 0:
            raise ValueError(f"mixing.{idx}.experts in {state_path} must be [C] or [B, C] with C >= 1 core experts")
        mixing[idx] = Mixing(parts["experts"], parts["logits"], parts["positions"])
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
    except Exception as exc:  # whatever a setter raises, the routing state goes back to what it was
        _restore(snapshot)
        if isinstance(exc, (ValueError, TypeError, KeyError, IndexError, RuntimeError)):
            raise ValueError(f"the routing state in {directory} does not fit this model: {exc}") from exc
        raise
    return rm


def __getattr__(name: str) -> Any:
    if name == "from_pretrained":  # moved to reroute.attach (it attaches, which this module sits below)
        from reroute.attach import from_pretrained

        return from_pretrained
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
