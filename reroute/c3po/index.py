"""The reference index: successful reference items with their embeddings and routing pathways (C3PO §2, §3.4).

Built by running the model on a labelled reference set and keeping the items it answers correctly. Stored in a
folder, no pickle anywhere:

* ``embeddings.faiss`` — FAISS index of L2-normalised embeddings (inner product = cosine similarity);
* ``pathways.safetensors`` — ``pathways [N, L, E]``: per-expert routing scores at each item's last prompt token
  in every MoE layer (float32), and ``embeddings [N, D]``;
* ``index.json`` — model fingerprint, embedder name, items (prompt, label, ...), the keys of every item seen
  (successful or not), so a build can resume or be extended without redoing work, and the size and SHA-256 of the
  two other files: a file replaced or changed after saving is refused at load.

A save writes a new folder beside the target and renames it into place, so a failed save leaves the previous
index whole.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from reroute.attach import RoutedModel
from reroute.c3po.embed import make_embedder, prompt_pathways
from reroute.data import Item, item_key, load_items
from reroute.progress import progress_bar
from reroute.scoring import answer_matches, generate_with, score_with

FORMAT = "reroute-reference-index"
VERSION = 2  # 2: file sizes and SHA-256 in index.json
FILES = ("embeddings.faiss", "pathways.safetensors", "index.json")
DATA_FILES = FILES[:2]


class ReferenceIndexError(ValueError):
    """A reference index that cannot be used as asked (empty, mismatched, corrupted)."""


@dataclass
class Neighbours:
    """Search result for Q queries: ``ids [Q, k]`` (-1 where fewer than k were found) and ``similarity [Q, k]``."""

    ids: torch.Tensor
    similarity: torch.Tensor


class ReferenceIndex:
    """Successful reference items: embeddings (FAISS), routing pathways and labels."""

    def __init__(
        self,
        fingerprint: dict[str, Any],
        embedder_name: str,
        mode: str,
        items: list[Item],
        embeddings: torch.Tensor,
        pathways: torch.Tensor,
        seen: list[str],
        faiss_kind: str = "flat",
        query_field: str = "prompt",
    ) -> None:
        self.fingerprint = fingerprint
        self.query_field = query_field
        self.embedder_name = embedder_name
        self.mode = mode
        self.items = items
        self.embeddings = embeddings.float()
        self.pathways = pathways.float()
        self.seen = seen
        self.faiss_kind = faiss_kind
        self._faiss = None
        # the embedder object the user gave to build, extend or load this index (never one named only by the file)
        self.embedder: Any = None

    def __len__(self) -> int:
        return len(self.items)

    def __repr__(self) -> str:
        return (
            f"ReferenceIndex({len(self)} successful of {len(self.seen)} seen, embedder={self.embedder_name}, "
            f"mode={self.mode}, pathways {tuple(self.pathways.shape)})"
        )

    # ------------------------------------------------------------------------------------------ building
    @classmethod
    def build(
        cls,
        rm: RoutedModel,
        tokenizer: Any,
        data: Any,
        embedder: Any = None,
        mode: str = "mc",
        batch_size: int = 16,
        path: str | Path | None = None,
        faiss_kind: str = "flat",
        progress: bool = True,
        query_field: str = "prompt",
    ) -> ReferenceIndex:
        """Run the model on ``data`` (Dataset, JSONL path or dicts) and keep what it answers correctly.

        ``query_field`` names the item field that is embedded for retrieval (the reference items' and, at test time,
        the queries'): the whole ``prompt`` by default, or e.g. a bare ``question`` without the instructions,
        few-shot demonstrations or task cue that the reference set's prompts carry and the test prompts may not.
        The pathways always come from the full prompt.

        With ``path``, progress is saved there after every batch and an existing index at ``path`` is resumed
        (items already seen are skipped); :meth:`extend` adds data to an index later.
        """
        embed = make_embedder(embedder)
        if path is not None and (Path(path) / "index.json").is_file():
            index = cls.load(path, rm, embed)
        else:
            index = cls(
                rm.fingerprint(),
                embed.name,
                mode,
                [],
                torch.zeros(0, 0),
                torch.zeros(0, 0, 0),
                [],
                faiss_kind,
                query_field,
            )
        if index.mode != mode:
            raise ReferenceIndexError(f"the index at {path} was built in {index.mode!r} mode, not {mode!r}")
        if index.query_field != query_field:
            raise ReferenceIndexError(
                f"the index at {path} embeds the {index.query_field!r} field, not {query_field!r}"
            )
        return index.extend(rm, tokenizer, data, embed, batch_size, path, progress)

    def extend(
        self,
        rm: RoutedModel,
        tokenizer: Any,
        data: Any,
        embedder: Any = None,
        batch_size: int = 16,
        path: str | Path | None = None,
        progress: bool = True,
    ) -> ReferenceIndex:
        """Add the successful items of ``data`` not seen before (saving to ``path`` after each batch)."""
        embed = make_embedder(embedder)
        self._check_compatible(rm.fingerprint(), embed.name)
        self.embedder = embed
        seen = set(self.seen)
        todo = [item for item in load_items(data) if item_key(item) not in seen]
        if self.mode == "mc" and any(item.get("choices") is None for item in todo):
            raise ReferenceIndexError("multiple-choice index: every reference item needs choices and a label")
        self.query_texts(todo)  # every item has the retrieval field, before any model run
        with progress_bar(progress, "reference index", len(todo)) as advance:
            for start in range(0, len(todo), batch_size):
                batch = todo[start : start + batch_size]
                self._add_batch(rm, tokenizer, batch, embed)
                if path is not None:
                    self.save(path)
                advance(len(batch))
        return self

    def _add_batch(self, rm: RoutedModel, tokenizer: Any, batch: Sequence[Item], embed: Any) -> None:
        if self.mode == "mc":
            correct = [int(p) == int(item["label"]) for p, item in zip(score_with(rm, tokenizer, batch), batch)]
        else:
            budget = max(len(tokenizer(" " + item["answer"])["input_ids"]) for item in batch) + 2
            texts = generate_with(rm, tokenizer, batch, budget)
            correct = [answer_matches(t, item["answer"]) for t, item in zip(texts, batch)]
        self.seen += [item_key(item) for item in batch]
        keep = [item for item, ok in zip(batch, correct) if ok]
        if not keep:
            return
        embeddings = embed(rm, tokenizer, self.query_texts(keep)).float().cpu()
        pathways = prompt_pathways(rm, tokenizer, [item["prompt"] for item in keep])
        self.embeddings = embeddings if len(self.items) == 0 else torch.cat([self.embeddings, embeddings])
        self.pathways = pathways if len(self.items) == 0 else torch.cat([self.pathways, pathways])
        self.items += keep
        self._faiss = None  # rebuilt on the next search or save

    def query_texts(self, items: Sequence[Item | str]) -> list[str]:
        """The text embedded for retrieval: each item's ``query_field`` (a bare string counts as a prompt)."""
        texts = []
        for item in items:
            if isinstance(item, str):
                item = {"prompt": item}
            text = item.get(self.query_field)
            if not isinstance(text, str):
                name = item.get("id", repr(item.get("prompt", ""))[:60])
                raise ReferenceIndexError(
                    f"the index retrieves by the {self.query_field!r} field, which item {name} lacks (a text is needed)"
                )
            texts.append(text)
        return texts

    # ------------------------------------------------------------------------------------------ searching
    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1]) if len(self) else 0

    def _index(self):
        import faiss

        if self._faiss is None:
            self.require_nonempty()
            vectors = np.ascontiguousarray(self.embeddings.numpy(), dtype=np.float32)
            if self.faiss_kind == "flat":
                index = faiss.IndexFlatIP(self.dim)
            elif self.faiss_kind == "hnsw":
                index = faiss.IndexHNSWFlat(self.dim, 32, faiss.METRIC_INNER_PRODUCT)
            elif self.faiss_kind == "ivf":
                lists = max(1, int(np.sqrt(len(self))))
                index = faiss.IndexIVFFlat(faiss.IndexFlatIP(self.dim), self.dim, lists, faiss.METRIC_INNER_PRODUCT)
                index.train(vectors)
                index.nprobe = min(lists, 8)
            else:
                raise ReferenceIndexError(f"unknown FAISS index kind {self.faiss_kind!r}: use 'flat', 'hnsw' or 'ivf'")
            index.add(vectors)
            self._faiss = index
        return self._faiss

    def require_nonempty(self) -> None:
        if len(self) == 0:
            raise ReferenceIndexError(
                f"the reference index is empty ({len(self.seen)} items seen, none answered correctly); "
                "build it on a reference set the model partly solves"
            )

    def search(self, queries: torch.Tensor, k: int, exclude_above: float = 0.95) -> Neighbours:
        """The ``k`` most similar successful items per query ``[Q, D]``, excluding near-duplicates of the query
        (cosine similarity above ``exclude_above``, the C3PO paper's leakage guard)."""
        self.require_nonempty()
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        if k > len(self):
            raise ReferenceIndexError(f"k={k} exceeds the {len(self)} items in the reference index")
        queries = torch.as_tensor(queries).float()
        if not torch.isfinite(queries).all():
            raise ValueError("query embeddings contain NaN or infinite values; check the embedder's output")
        queries = torch.nn.functional.normalize(queries, dim=-1)
        if queries.dim() != 2 or queries.shape[1] != self.dim:
            raise ReferenceIndexError(
                f"query embeddings have shape {tuple(queries.shape)}; the index holds {self.dim}-dimensional "
                f"embeddings from {self.embedder_name}"
            )
        out_ids = torch.full((len(queries), k), -1, dtype=torch.long)
        out_sim = torch.zeros(len(queries), k)
        fetch = min(len(self), k + 16)
        while True:  # widen the search until k neighbours survive the near-duplicate exclusion, or none are left
            sims, ids = self._index().search(np.ascontiguousarray(queries.numpy()), fetch)
            short = False
            for q in range(len(queries)):
                keep = [(i, s) for i, s in zip(ids[q], sims[q]) if i >= 0 and s <= exclude_above][:k]
                short |= len(keep) < k
                for j, (i, s) in enumerate(keep):
                    out_ids[q, j], out_sim[q, j] = int(i), float(s)
            if not short or fetch >= len(self):
                break
            fetch = min(len(self), 4 * fetch)
        return Neighbours(out_ids, out_sim)

    # ------------------------------------------------------------------------------------------ storage
    def save(self, path: str | Path) -> Path:
        """Write the index to the folder ``path`` (created or replaced whole: written beside it, then renamed)."""
        import faiss
        from safetensors.torch import save_file

        path = Path(path)
        if path.exists() and not path.is_dir():
            raise ReferenceIndexError(f"cannot save a reference index to {path}: it is a file; give a folder path")
        if path.is_dir() and any(path.iterdir()) and not (path / "index.json").is_file():
            raise ReferenceIndexError(
                f"{path} is a folder that holds no reference index; save to a new or empty folder"
            )
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = path.parent / f".{path.name}.saving-{uuid.uuid4().hex[:8]}"
        staging.mkdir()
        try:
            tensors = {"pathways": self.pathways.contiguous(), "embeddings": self.embeddings.contiguous()}
            save_file(tensors, str(staging / "pathways.safetensors"))
            if len(self):
                faiss.write_index(self._index(), str(staging / "embeddings.faiss"))
            meta = {
                "format": FORMAT,
                "version": VERSION,
                "fingerprint": self.fingerprint,
                "embedder": self.embedder_name,
                "query_field": self.query_field,
                "mode": self.mode,
                "faiss": self.faiss_kind,
                "size": len(self),
                "files": {name: _file_digest(staging / name) for name in DATA_FILES if (staging / name).is_file()},
                "items": self.items,
                "seen": self.seen,
            }
            (staging / "index.json").write_text(json.dumps(meta) + "\n")
            _replace_folder(staging, path)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return path

    @classmethod
    def load(cls, path: str | Path, rm: RoutedModel | None = None, embedder: Any = None) -> ReferenceIndex:
        """Load an index; with ``rm``/``embedder`` given, an index built for another model or embedder is an error.

        Loading never loads a model the caller did not name: the file only records the embedder's name, and an
        index built with an external encoder (sentence-transformers, a callable) needs ``embedder=`` here or in
        :class:`~reroute.C3PO` (checked against the recorded name). Files changed since saving are refused.
        """
        import faiss
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        path = Path(path)
        if not (path / "index.json").is_file():
            raise FileNotFoundError(f"{path} holds no reference index (index.json missing)")
        try:
            meta = json.loads((path / "index.json").read_text())
        except json.JSONDecodeError as exc:
            raise ReferenceIndexError(f"{path}/index.json is corrupted: {exc}") from exc
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise ReferenceIndexError(f"{path} is not a reroute reference index")
        missing = [key for key in ("fingerprint", "embedder", "mode", "size", "items") if key not in meta]
        if missing:
            raise ReferenceIndexError(f"{path}/index.json lacks {', '.join(missing)}; rebuild the index")
        _check_files(path, meta)
        try:
            tensors = load_file(str(path / "pathways.safetensors"))
        except (FileNotFoundError, SafetensorError, OSError) as exc:
            raise ReferenceIndexError(f"{path}/pathways.safetensors is missing or corrupted: {exc}") from exc
        items, size = meta.get("items", []), meta.get("size", -1)
        if len(items) != size or tensors["pathways"].shape[0] != size or tensors["embeddings"].shape[0] != size:
            raise ReferenceIndexError(f"{path} is truncated: {size} items announced, files disagree")
        index = cls(
            meta["fingerprint"],
            meta["embedder"],
            meta["mode"],
            items,
            tensors["embeddings"],
            tensors["pathways"],
            meta.get("seen", []),
            meta.get("faiss", "flat"),
            meta.get("query_field", "prompt"),
        )
        if size:
            try:
                stored = faiss.read_index(str(path / "embeddings.faiss"))
            except RuntimeError as exc:
                raise ReferenceIndexError(f"{path}/embeddings.faiss is missing or corrupted: {exc}") from exc
            if stored.ntotal != size or stored.d != index.dim:
                raise ReferenceIndexError(
                    f"{path}/embeddings.faiss holds {stored.ntotal}x{stored.d}, expected {size}x{index.dim}"
                )
            index._faiss = stored
        if rm is not None or embedder is not None:
            # the embedder is made from what the caller named, never from the name the file records
            embed = make_embedder(embedder) if embedder is not None else None
            index._check_compatible(
                rm.fingerprint() if rm is not None else index.fingerprint,
                embed.name if embed is not None else index.embedder_name,
            )
            index.embedder = embed
        return index

    def _check_compatible(self, fingerprint: dict[str, Any], embedder_name: str) -> None:
        if fingerprint != self.fingerprint:
            raise ReferenceIndexError(
                f"the reference index was built for another model ({self.fingerprint}); this model is {fingerprint}"
            )
        if embedder_name != self.embedder_name:
            raise ReferenceIndexError(
                f"the reference index holds {self.embedder_name} embeddings; cannot use embedder {embedder_name}"
            )


def _file_digest(file: Path) -> dict[str, Any]:
    """``{"bytes": size, "sha256": hex digest}`` of a file."""
    digest = hashlib.sha256()
    with open(file, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return {"bytes": file.stat().st_size, "sha256": digest.hexdigest()}


def _check_files(path: Path, meta: dict[str, Any]) -> None:
    """Refuse data files that differ from those the index was saved with (indexes saved before version 2 carry no
    digests and are not checked)."""
    recorded = meta.get("files")
    if recorded is None and meta.get("version", 1) < 2:
        return
    if not isinstance(recorded, dict):
        raise ReferenceIndexError(f"{path}/index.json lacks the digests of its files; rebuild the index")
    for name in DATA_FILES:
        if name not in recorded:
            if name == "embeddings.faiss" and meta.get("size") == 0:
                continue
            raise ReferenceIndexError(f"{path}/index.json records no digest for {name}; rebuild the index")
        if not (path / name).is_file():
            raise ReferenceIndexError(f"{path}/{name} is missing; rebuild the index")
        if _file_digest(path / name) != recorded[name]:
            raise ReferenceIndexError(
                f"{path}/{name} is corrupted or was replaced after saving (its size or SHA-256 differs from what "
                "index.json records): rebuild the index"
            )


def _replace_folder(staging: Path, path: Path) -> None:
    """Move the complete folder ``staging`` to ``path``, replacing what is there; the old folder is renamed aside
    first and removed only once the new one is in place (a crash in between leaves one of the two whole)."""
    old = None
    if path.exists():
        old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
        path.rename(old)
    try:
        staging.rename(path)
    except OSError:
        if old is not None:
            old.rename(path)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
