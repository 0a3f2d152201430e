"""``autolora eval retrieval``: how well search finds held-out LoRAs, per channel, against the
authors' design and non-learned baselines (queries and metrics: :mod:`retrieval_queries`).

Rows: ``weights``, ``text`` and ``hybrid`` through :meth:`registry.Registry.search` over the
held-out pool (the zero-shot setting; ``where`` keeps the pool), the same three on a **stripped**
copy of the held-out LoRAs (hashed file names, no sidecars, no header metadata: the weights alone)
ingested into a scratch registry with the same encoder, then ``paper_design``, ``weight_stats``,
``render_read`` and ``random`` (:mod:`retrieval_baselines`). ``whole_registry`` repeats our three
channels over every LoRA of the registry.

``canonical_oracle`` is a reference, not a method: each held-out LoRA embedded as the query its
theme gets in *canonical* words ("green triangle" for a "jade pyramid"), i.e. a weight encoder
that reads every LoRA's values perfectly. With a text encoder that does not place a synonym near
its canonical word, that reference misses synonym queries, which bounds what any encoder that maps a
LoRA to what it does can reach on them; ``by_query_kind`` reports every row over synonym and
canonical queries apart. Writes ``retrieval.md`` (provenance, legend, tables), ``retrieval.json``
(the returned object, with ``provenance``: world, registry, text encoder, both encoders' versions and
pools, date) and cosine heatmaps; the stripped scratch registry lives in a temporary folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from models.encoder import LoRAWeightEncoder
from pipelines.encoder_pool import Recipe, layer_specs, train_registry_encoder
from pipelines.evaluate import retrieval_baselines as baselines
from pipelines.evaluate.retrieval_queries import (
    DEPTH, canonical_text, make_queries, metrics, metrics_by_kind, random_metrics, rank_by_cosine, theme_cosines,
)
from pipelines.evaluate.retrieval_report import write_report
from registry import Registry
from registry.hashing import sha256_file
from registry.lora.inspect import load_canonical
from registry.store.store import where_in

CHANNELS = ("weights", "text", "hybrid")
BUNDLED_TEXT_ENCODER = "all-MiniLM-L6-v2 (bundled)"  # what an encoder's text_encoder "" means


class NotEvaluable(LookupError):
    """The registry cannot be evaluated against the world (its LoRAs missing, no active encoder)."""


def manifest_ids(reg: Registry, root: Path, entries: list[dict]) -> dict[str, str]:
    """World file (relative) -> lora_id through the registry's file records: by path while the file's
    size, mtime and inode are the recorded ones, else by content (sha256), so a copied or moved
    world matches the registry it was ingested into."""
    paths = {os.path.realpath(root / e["file"]): e["file"] for e in entries}
    found: dict[str, str] = {}
    for row in reg.rows(reg.files, where_in("path", paths), len(paths),
                        ["path", "lora_id", "size_bytes", "mtime_ns", "inode"]):
        st = _stat(row["path"])
        if row["lora_id"] and st and (st.st_size, st.st_mtime_ns, st.st_ino) == (
                row["size_bytes"], row["mtime_ns"], row["inode"]):
            found[paths[row["path"]]] = row["lora_id"]
    by_hash: dict[str, list[str]] = {}
    for path, file in paths.items():
        if file not in found and os.path.isfile(path):
            by_hash.setdefault(sha256_file(path), []).append(file)
    if by_hash:
        for row in reg.rows(reg.files, where_in("sha256", by_hash), max(reg.files.count_rows(), 1),
                            ["sha256", "lora_id"]):
            for file in by_hash[row["sha256"]] if row["lora_id"] else ():
                found.setdefault(file, row["lora_id"])
    missing = [f for f in paths.values() if f not in found]
    if missing:
        raise NotEvaluable(f"{len(missing)} world LoRA(s) are not in {reg.root} (e.g. {missing[0]}): "
                          "ingest the world first")
    return found


def _stat(path: str) -> os.stat_result | None:
    try:
        return os.stat(path)
    except OSError:
        return None


def _search_rows(reg: Registry, queries, pool: list[str] | None) -> dict[str, list[list[str]]]:
    where = where_in("lora_id", pool) if pool else None
    return {c: [[h.lora_id for h in reg.search(q.text, k=DEPTH, channel=c, where=where)] for q in queries]
            for c in CHANNELS}


def canonical_oracle_rankings(pool: list[str], heldout: list[dict], queries, embed) -> list[list[str]]:
    """Rankings with each held-out LoRA embedded as its theme's query in canonical words;
    ``embed(texts)`` embeds as the weight channel embeds its queries."""
    return rank_by_cosine(pool, embed([canonical_text(e["attrs"]) for e in heldout]), embed([q.text for q in queries]))


def weight_query_embedder(record):
    """``embed(texts)`` as the weight channel embeds queries for the encoder ``record``."""
    from registry.store.weight_query import query_vectors

    return lambda texts: query_vectors(record.info.get("text_encoder", ""), record.path, texts)


def stripped_copy(reg: Registry, root: Path, entries: list[dict], scratch: Path) -> Registry:
    """The held-out LoRAs with hashed names, no sidecars and no header metadata, ingested into a
    new scratch registry that has the same base models and active encoders."""
    from safetensors.torch import load_file, save_file

    if scratch.exists():
        shutil.rmtree(scratch)
    files = scratch / "files"
    files.mkdir(parents=True)
    for entry in entries:
        name = hashlib.sha256(entry["file"].encode()).hexdigest()[:16]
        save_file(load_file(root / entry["file"]), files / f"{name}.safetensors")  # no metadata
    copy = Registry.open(scratch / "registry")
    for base in reg.bases():
        copy.register_base(base)
    for record in reg.encoder_versions():
        if record.active:
            copy.register_encoder(record.path)
    copy.add([files])
    return copy


def provenance(reg: Registry, root: Path, manifest: dict, active, pool: list[str]) -> dict:
    """Where the numbers come from: the world, the registry (and its version), the text encoder, our
    encoder and its training pool, whether any held-out LoRA was in that pool, and the UTC date."""
    trained_on = set(active.info.get("pool") or [])
    return {"world": {"root": str(Path(root).resolve()), "key": manifest.get("key", ""), "seed": manifest.get("seed")},
            "registry": {"root": str(Path(reg.root).resolve()), "version": reg.version},
            "text_encoder": active.info.get("text_encoder", "") or BUNDLED_TEXT_ENCODER,
            "encoder": {"version": active.version, "pool_size": len(trained_on), "where": active.info.get("where", "")},
            "heldout_in_encoder_pool": len(trained_on & set(pool)),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def _remove_old_scratch(out: Path) -> None:
    """Earlier versions left the stripped scratch registry as ``OUT/stripped/`` (files + registry)."""
    old = out / "stripped"
    if old.is_dir() and {p.name for p in old.iterdir()} <= {"files", "registry"} and (old / "registry").is_dir():
        shutil.rmtree(old)


def evaluate_retrieval(registry_dir: str | os.PathLike, world_dir: str | os.PathLike, out_dir: str | os.PathLike,
                       *, baselines_too: bool = True, progress: bool = False) -> dict:
    """Run the evaluation (the out folder is made only once the registry and world are found
    evaluable); returns the ``autolora eval retrieval --json`` object, also written as ``retrieval.json``."""
    from pipelines.world.evaluate import resolve_world_root

    root = resolve_world_root(world_dir)
    manifest = json.loads((root / "world.json").read_text())
    reg = Registry.open(registry_dir, create=False)
    active = next((r for r in reg.encoder_versions() if r.active), None)
    if active is None:
        raise NotEvaluable(f"{reg.root} has no active LoRA-weight encoder: train one first (autolora train encoder)")
    entries = manifest["loras"]
    ids = manifest_ids(reg, root, entries)
    heldout = [e for e in entries if e["split"] == "heldout"]
    if not heldout:
        raise NotEvaluable(f"the world at {root} has no held-out LoRAs")
    pool = [ids[e["file"]] for e in heldout]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _remove_old_scratch(out)
    attrs_of = {ids[e["file"]]: e["attrs"] for e in entries}
    queries = make_queries(heldout)
    report: dict = {"queries": len(queries), "pool": len(pool), "encoder": active.version,
                    "provenance": provenance(reg, root, manifest, active, pool)}
    rankings = _search_rows(reg, queries, pool)
    for channel, ranks in rankings.items():
        report[channel] = metrics(ranks, queries, attrs_of)
    rankings["canonical_oracle"] = canonical_oracle_rankings(pool, heldout, queries, weight_query_embedder(active))
    report["canonical_oracle"] = metrics(rankings["canonical_oracle"], queries, attrs_of)
    report["by_query_kind"] = {row: metrics_by_kind(ranks, queries, attrs_of) for row, ranks in rankings.items()}
    with tempfile.TemporaryDirectory(prefix="autolora-stripped-", ignore_cleanup_errors=True) as scratch:  # not kept
        copy = stripped_copy(reg, root, heldout, Path(scratch) / "stripped")
        report["stripped"] = {c: metrics(r, queries, attrs_of) for c, r in _search_rows(copy, queries, None).items()}
        del copy
    report["whole_registry"] = {c: metrics(r, queries, attrs_of) for c, r in _search_rows(reg, queries, None).items()}
    report["whole_registry"]["pool"] = len(reg)

    rows = {r["lora_id"]: r for r in reg.rows(reg.loras, where_in("lora_id", pool), len(pool),
                                                ["lora_id", "weight_vector", "blob", "base_model"])}
    ours = np.asarray([rows[i]["weight_vector"] for i in pool], dtype=np.float32)
    families = [e["family"] for e in heldout]
    report["within_theme_cos"], report["cross_theme_cos"] = theme_cosines(ours, families)
    report["random"] = random_metrics(pool, queries, attrs_of)
    figures = {"weights": (ours, families)}
    if baselines_too:
        baseline_rows, report["provenance"]["paper_design"] = _baselines(
            reg, root, active, pool, rows, queries, attrs_of, figures, progress)
        report.update(baseline_rows)
    report["figures"] = write_report(out, report, figures, [e["theme"] for e in heldout])
    (out / "retrieval.json").write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
    return report


def paper_design_encoder(reg: Registry, active, progress: bool = False) -> tuple[object, dict]:
    """The authors' design trained (or reused: a version is its pool and recipe) on exactly the
    LoRAs ``active`` was trained on, with its recipe and text encoder; returns its record and
    ``{"version", "pool_size", "trained", "seconds"}``."""
    trained_on = active.info.get("pool") or []
    where = where_in("lora_id", trained_on) if trained_on else (active.info.get("where") or None)
    recipe = Recipe(**{**active.info.get("recipe", {}), "design": "paper", "probes_from": "",
                       "text_encoder": active.info.get("text_encoder", "")})  # their learned probes
    info = train_registry_encoder(reg, active.base_model, where, recipe, activate=False,
                                  progress=progress)  # registered inactive: trained once per pool
    record = next(r for r in reg.encoder_versions() if r.version == info["version"])
    return record, {"version": record.version, "pool_size": len(record.info.get("pool") or []),
                    "trained": bool(info["trained"]), "seconds": info.get("seconds", 0.0) if info["trained"] else 0.0}


def _baselines(reg: Registry, root: Path, active, pool, rows, queries, attrs_of, figures,
               progress) -> tuple[dict, dict]:
    """The baseline and anchor rows, and the provenance of the authors' design encoder they used."""
    from models.text_encoder import default_text_encoder
    from pipelines.encoder_pool import lora_texts

    base = rows[pool[0]]["base_model"]
    shapes = {s.name: (s.d_out, s.d_in) for s in layer_specs(reg, base)}
    held = [load_canonical(reg.root / rows[i]["blob"], reg.bases())[0].factors for i in pool]
    q = default_text_encoder().encode([x.text for x in queries])
    record, used = paper_design_encoder(reg, active, progress)
    paper = LoRAWeightEncoder.load(record.path)
    out: dict = {}
    emb = baselines.paper_embeddings(paper, held)
    figures["paper_design"] = (emb, figures["weights"][1])
    paper_q = weight_query_embedder(record)([x.text for x in queries])
    out["paper_design"] = metrics(rank_by_cosine(pool, emb, paper_q), queries, attrs_of)
    out["paper_design"]["within_theme_cos"], out["paper_design"]["cross_theme_cos"] = theme_cosines(
        emb, figures["weights"][1])
    train_ids = active.info.get("pool", [])
    train_rows = reg.rows(reg.loras, where_in("lora_id", train_ids), len(train_ids),
                          ["lora_id", "blob", "name", "description", "tags", "render_prompts", "captions"])
    train = [load_canonical(reg.root / r["blob"], reg.bases())[0].factors for r in train_rows]
    emb = baselines.weight_stats_embeddings(train, [lora_texts(r) or [r["lora_id"]] for r in train_rows], held, shapes)
    out["weight_stats"] = metrics(rank_by_cosine(pool, emb, q), queries, attrs_of)
    emb, _ = baselines.render_read_embeddings(root, held, progress=progress)
    out["render_read"] = metrics(rank_by_cosine(pool, emb, q), queries, attrs_of)
    return out, used
