"""Retrieval end to end on a micro world, as a user runs it: ingest the training LoRAs, train the
encoder (cached while the pool is unchanged), ingest held-out LoRAs (embedded zero-shot), search
every channel, and the evaluation's JSON contract."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

AUTOLORA = str(Path(sys.executable).with_name("autolora"))
METRICS = {"recall_at_1", "recall_at_3", "recall_at_10", "mrr"}


def run_json_err(*args: str):
    """The CLI's ``--json`` object and its stderr."""
    out = subprocess.run([AUTOLORA, *args, "--json"], capture_output=True, text=True, timeout=1200,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout), out.stderr


def run_json(*args: str):
    return run_json_err(*args)[0]


@pytest.fixture(scope="module")
def trained(micro_world, tmp_path_factory):
    registry = str(tmp_path_factory.mktemp("retrieval") / "registry")
    run_json("register-base", str(micro_world / "base_model.json"), "--registry", registry)
    run_json("ingest", str(micro_world / "loras"), "--registry", registry)
    pool = f"source_path LIKE '{os.path.realpath(micro_world / 'loras')}/%'"
    probes = ["--probes-from", str(micro_world)]  # probes from the base's real layer inputs
    first = run_json("train", "encoder", "--registry", registry, "--where", pool, "--steps", "30", *probes)
    again = run_json("train", "encoder", "--registry", registry, "--where", pool, "--steps", "30", *probes)
    held = run_json("ingest", str(micro_world / "heldout_loras"), "--registry", registry)
    return registry, first, again, held


def test_encoder_is_trained_once_per_pool_and_embeds_new_loras_zero_shot(trained, micro_world):
    from pipelines.encoder_pool import PROBED_VIEWS
    from registry import Registry

    registry, first, again, held = trained
    manifest = json.loads((micro_world / "world.json").read_text())
    assert first["trained"] and first["pool_size"] == manifest["train"]
    assert first["embedding"]["activated"] == first["version"]
    assert not again["trained"] and again["version"] == first["version"]
    assert first["recipe"]["probes_from"] == str(micro_world)
    assert first["views"] == PROBED_VIEWS > 1  # with the base's probes, each LoRA as several augmentations
    reg = Registry.open(registry, create=False)
    rows = reg.loras.to_arrow().select(["lora_id", "encoder_version", "weight_vector"]).to_pylist()
    assert len(rows) == manifest["train"] + manifest["heldout"]
    assert all(r["encoder_version"] == first["version"] and len(r["weight_vector"]) == 384 for r in rows)
    assert {a["lora_id"] for a in held["added"]} <= {r["lora_id"] for r in rows}


def test_search_channels_from_the_cli(trained):
    registry = trained[0]
    results = {c: run_json("search", "a red circle", "--registry", registry, "--channel", c, "-k", "3")
               for c in ("weights", "text", "hybrid")}
    assert all(len(hits) == 3 for hits in results.values())
    assert all(-1 <= h["score"] <= 1 for h in results["weights"])


@pytest.fixture(scope="module")
def evaluated(trained, micro_world, tmp_path_factory):
    """``eval retrieval --json`` (baselines on) into a fresh out folder: report, out, the registry's
    version before, stderr, and the temporary stripped folders that existed before."""
    from registry import Registry

    out = tmp_path_factory.mktemp("evaluated") / "report"
    version = Registry.open(trained[0], create=False).version
    scratch_before = set(Path(tempfile.gettempdir()).glob("autolora-stripped-*"))
    report, stderr = run_json_err("eval", "retrieval", "--registry", trained[0], "--world", str(micro_world),
                                  "--out", str(out))
    return report, out, version, stderr, scratch_before


def test_retrieval_evaluation_contract(trained, evaluated, micro_world):
    report, tmp_path = evaluated[:2]
    for row in ("weights", "text", "hybrid", "paper_design", "weight_stats", "render_read", "random",
                "canonical_oracle"):
        assert set(report[row]) >= METRICS and all(0 <= report[row][m] <= 1 for m in METRICS), row
    # every query is synonym or canonical; the canonical-word reference finds every canonical one
    kinds = report["by_query_kind"]
    assert set(kinds) == {"weights", "text", "hybrid", "canonical_oracle"}
    assert sum(k["queries"] for k in kinds["weights"].values()) == report["queries"]
    assert kinds["canonical_oracle"]["canonical"]["recall_at_10"] == 1.0
    assert set(report["stripped"]) == {"weights", "text", "hybrid"}
    assert report["pool"] == json.loads((micro_world / "world.json").read_text())["heldout"]
    assert report["queries"] > report["pool"]
    assert -1 <= report["cross_theme_cos"] <= 1 and -1 <= report["within_theme_cos"] <= 1
    assert (tmp_path / "retrieval.md").is_file() and (tmp_path / "heatmap-weights.png").is_file()
    # the stripped copy has no text at all: hashed names get no text vector and match no query word,
    # so its text channel finds nothing and its hybrid search is its weight channel
    assert report["stripped"]["weights"] == report["weights"]
    assert report["stripped"]["hybrid"] == report["stripped"]["weights"]
    assert all(v == 0 for v in report["stripped"]["text"].values())
    # the authors' design row is theirs: learned probes, whatever our encoder was given
    from registry import Registry

    paper = [r for r in Registry.open(trained[0], create=False).encoder_versions() if "-paper-" in r.version]
    assert paper and all(r.info["recipe"]["probes_from"] == "" for r in paper)


def test_the_report_says_where_its_numbers_come_from(trained, evaluated, micro_world):
    from registry import Registry

    report, out, version = evaluated[:3]
    manifest = json.loads((micro_world / "world.json").read_text())
    reg = Registry.open(trained[0], create=False)
    active = next(r for r in reg.encoder_versions() if r.active)
    paper = next(r for r in reg.encoder_versions() if "-paper-" in r.version)
    prov = report["provenance"]
    assert prov["world"] == {"root": os.path.realpath(micro_world), "key": manifest["key"], "seed": manifest["seed"]}
    assert prov["registry"] == {"root": os.path.realpath(trained[0]), "version": version}
    assert prov["text_encoder"] == "all-MiniLM-L6-v2 (bundled)"  # the encoder's text_encoder is ""
    assert prov["encoder"]["version"] == active.version == report["encoder"]
    assert prov["encoder"]["pool_size"] == manifest["train"] and prov["heldout_in_encoder_pool"] == 0
    assert prov["paper_design"]["version"] == paper.version
    assert prov["paper_design"]["pool_size"] == manifest["train"]
    date = datetime.fromisoformat(prov["date"])
    assert date.utcoffset() == timedelta(0) and abs(datetime.now(timezone.utc) - date) < timedelta(hours=1)
    markdown = (out / "retrieval.md").read_text()
    assert active.version in markdown and paper.version in markdown and manifest["key"] in markdown
    assert os.path.realpath(micro_world) in markdown and "all-MiniLM-L6-v2" in markdown


def test_the_report_writes_its_json_and_keeps_no_scratch_registry(evaluated):
    report, out, _, stderr, scratch_before = evaluated
    assert json.loads((out / "retrieval.json").read_text()) == report
    assert {p.name for p in out.iterdir()} == {"retrieval.md", "retrieval.json", "heatmap-weights.png",
                                               "heatmap-paper_design.png"}  # no stripped/ scratch registry
    assert set(Path(tempfile.gettempdir()).glob("autolora-stripped-*")) <= scratch_before
    assert "Loading pipeline components" not in stderr and "it/s]" not in stderr  # --json: quiet


def test_the_report_has_a_legend_a_caveat_and_both_designs_geometry(evaluated):
    report, out = evaluated[:2]
    markdown = (out / "retrieval.md").read_text()
    for text in ("## Legend", "| weights | ours |", "| stripped weights / text / hybrid | ours, no metadata |",
                 "| paper_design | anchor |", "| weight_stats | baseline |", "| render_read | baseline |",
                 "| random | baseline |", "| canonical_oracle | reference |", "Recall@k", "MRR@10",
                 "0 when none is in the top 10", "theme fixes the attribute value(s)", "never seen by the encoder",
                 "file names, trigger words and cards", "no-metadata setting",
                 f"Held-out queries over all {report['whole_registry']['pool']} LoRAs of the registry; "
                 "training LoRAs count as hits here (not zero-shot)",
                 "different LoRAs of the same theme family"):
        assert text in markdown, text
    paper = report["paper_design"]
    assert f"| paper_design (authors' design) | {paper['within_theme_cos']:.3f} | {paper['cross_theme_cos']:.3f} |" \
        in markdown


def test_the_authors_design_is_trained_on_our_encoders_pool_not_the_live_filter(micro_world, tmp_path):
    """A LoRA added later under the folder our encoder's ``where`` names must not change the
    authors'-design row: it is trained on (or reused for) exactly our encoder's training LoRAs."""
    from safetensors.torch import load_file, save_file

    from registry import Registry

    loras = tmp_path / "loras"
    shutil.copytree(micro_world / "loras", loras)
    registry = str(tmp_path / "registry")
    run_json("register-base", str(micro_world / "base_model.json"), "--registry", registry)
    run_json("ingest", str(loras), "--registry", registry)
    where = f"source_path LIKE '{os.path.realpath(loras)}/%'"
    run_json("train", "encoder", "--registry", registry, "--where", where, "--steps", "10")
    run_json("ingest", str(micro_world / "heldout_loras"), "--registry", registry)
    args = ("eval", "retrieval", "--registry", registry, "--world", str(micro_world))
    first = run_json(*args, "--out", str(tmp_path / "first"))["provenance"]["paper_design"]

    source = sorted(loras.glob("*.safetensors"))[0]  # a new LoRA the where filter matches
    save_file({k: v * 1.5 if v.is_floating_point() else v for k, v in load_file(source).items()},
              loras / "later-added.safetensors")
    run_json("ingest", str(loras), "--registry", registry)
    reg = Registry.open(registry, create=False)
    active = next(r for r in reg.encoder_versions() if r.active)
    assert reg.loras.count_rows(where) == len(active.info["pool"]) + 1
    second = run_json(*args, "--out", str(tmp_path / "second"))["provenance"]["paper_design"]
    assert second["version"] == first["version"] and not second["trained"]
    assert second["pool_size"] == first["pool_size"] == len(active.info["pool"])
    papers = [r for r in Registry.open(registry, create=False).encoder_versions() if "-paper-" in r.version]
    assert [r.version for r in papers] == [first["version"]]
    assert sorted(papers[0].info["pool"]) == sorted(active.info["pool"])


def test_a_refused_evaluation_creates_no_report_folder(micro_world, tmp_path):
    registry = str(tmp_path / "registry")
    run_json("register-base", str(micro_world / "base_model.json"), "--registry", registry)
    out = tmp_path / "new" / "report"
    result = subprocess.run([AUTOLORA, "eval", "retrieval", "--registry", registry, "--world", str(micro_world),
                             "--out", str(out), "--json"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 2 and "no active LoRA-weight encoder" in result.stderr
    assert not (tmp_path / "new").exists()


def test_the_retrieval_report_asset_materialises_the_evaluation(trained, micro_world, tmp_path):
    import dagster as dg

    from assets_defs.resources import RegistryResource
    from assets_defs.retrieval_report import retrieval_report

    config = {"world": str(micro_world), "out": str(tmp_path / "report"), "baselines": False}
    result = dg.materialize([retrieval_report], resources={"registry": RegistryResource(path=trained[0])},
                            run_config={"ops": {"retrieval_report": {"config": config}}},
                            instance=dg.DagsterInstance.ephemeral())
    assert result.success
    metadata = result.asset_materializations_for_node("retrieval_report")[0].metadata
    report = metadata["json"].value
    assert metadata["weights_recall_at_3"].value == report["weights"]["recall_at_3"]
    assert "canonical_oracle" in report and "paper_design" not in report  # baselines off
    assert "| canonical_oracle |" in metadata["report"].value and (tmp_path / "report" / "retrieval.md").is_file()


def test_an_encoder_trained_against_the_bases_clip_text_encoder_is_searched_with_clip_queries(micro_world, tmp_path):
    """`--text-encoder clip`: trained against the base pipeline's own CLIP text encoder (64-d,
    mapped into the stored 384-d space); the weight channel embeds queries the same way."""
    import numpy as np

    from registry import Registry
    from registry.store.weight_query import query_vectors

    registry = str(tmp_path / "registry")
    run_json("register-base", str(micro_world / "base_model.json"), "--registry", registry)
    run_json("ingest", str(micro_world / "loras"), "--registry", registry)
    info = run_json("train", "encoder", "--registry", registry, "--steps", "10", "--probes-from", str(micro_world),
                    "--text-encoder", "clip")
    assert info["text_encoder"] == f"clip:{micro_world / 'base'}" and info["trained"]
    reg = Registry.open(registry, create=False)
    record = next(r for r in reg.encoder_versions() if r.active)
    assert record.version == info["version"]
    rows = reg.loras.to_arrow().select(["lora_id", "weight_vector"]).to_pylist()
    prompt = "a red circle"
    query = query_vectors(info["text_encoder"], record.path, [prompt])[0]
    cosine = {r["lora_id"]: float(np.dot(query, r["weight_vector"]) / np.linalg.norm(r["weight_vector"])) for r in rows}
    expected = sorted(cosine, key=cosine.get, reverse=True)[:3]
    hits = reg.search(prompt, k=3, channel="weights")
    assert [h.lora_id for h in hits] == expected
    assert all(abs(h.score - cosine[h.lora_id]) < 1e-3 for h in hits)
    assert len(reg.search(prompt, k=3, channel="hybrid")) == 3
