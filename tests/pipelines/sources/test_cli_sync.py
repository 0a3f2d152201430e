"""``autolora sync``: the sources of a sources file into a registry, the cursor kept between runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "registry"))
from flux_fixtures import flux_lora, partial_names  # noqa: E402

from registry.lora.formats import save_lora  # noqa: E402

AUTOLORA = str(Path(sys.executable).with_name("autolora"))


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([AUTOLORA, *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_sync_ingests_new_files_once_and_keeps_its_cursor(tmp_path):
    folder = tmp_path / "loras"
    folder.mkdir()
    save_lora(folder / "one.safetensors", flux_lora(partial_names((1,), ()), rank=2, seed=1), "kohya")
    (tmp_path / "sources.toml").write_text('[[source]]\nkind = "local"\nname = "mine"\nfolder = "loras"\n')
    common = ["--registry", str(tmp_path / "registry"), "--sources", str(tmp_path / "sources.toml"),
              "--download-dir", str(tmp_path / "downloads"), "--json"]
    first = run("sync", *common)
    assert first.returncode == 0, first.stderr
    assert [Path(a["path"]).name for a in json.loads(first.stdout)["mine"]["ingest"]["added"]] == ["one.safetensors"]
    assert (tmp_path / "registry" / "sync" / "mine.cursor.json").is_file()
    assert not (tmp_path / "downloads" / "mine.cursor.json").exists()
    assert [p.name for p in (tmp_path / "registry" / "sync").iterdir()] == ["mine.cursor.json"]  # no temp files
    again = json.loads(run("sync", *common).stdout)["mine"]
    assert again["discovered"] == 0 and again["ingest"] is None  # the cursor says nothing is new
    save_lora(folder / "two.safetensors", flux_lora(partial_names((2,), ()), rank=2, seed=2), "kohya")
    third = json.loads(run("sync", "mine", *common).stdout)["mine"]
    assert [Path(a["path"]).name for a in third["ingest"]["added"]] == ["two.safetensors"]


def test_sync_usage_errors_are_one_line(tmp_path):
    (tmp_path / "bad.toml").write_text("[[source]\n")
    (tmp_path / "ok.toml").write_text('[[source]]\nkind = "local"\nname = "mine"\nfolder = "x"\n')
    registry = str(tmp_path / "registry")
    for args in (("--sources", str(tmp_path / "bad.toml")), ("--sources", str(tmp_path / "none.toml")),
                 ("nope", "--sources", str(tmp_path / "ok.toml"))):
        out = run("sync", *args, "--registry", registry)
        assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, out.stderr
        assert out.stderr.startswith("autolora sync: ")
    assert not Path(registry).exists()


def _sources(tmp_path: Path, *entries: tuple[str, str]) -> Path:
    text = "".join(f'[[source]]\nkind = "local"\nname = "{name}"\nfolder = "{folder}"\n' for name, folder in entries)
    (tmp_path / "sources.toml").write_text(text)
    return tmp_path / "sources.toml"


def test_each_registry_keeps_its_own_cursor_and_an_old_download_dir_cursor_is_ignored(tmp_path):
    """A registry synced after another one still gets every file: the cursor lives in the registry."""
    from pipelines.sources.local import LocalSource

    folder = tmp_path / "loras"
    folder.mkdir()
    save_lora(folder / "one.safetensors", flux_lora(partial_names((1,), ()), rank=2, seed=1), "kohya")
    sources = _sources(tmp_path, ("mine", "loras"))
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    # where the CLI kept the cursor before (per source only): says everything was seen; ignored now
    (downloads / "mine.cursor.json").write_text(json.dumps(
        {"source": LocalSource(folder, "mine").discover(None)[1], "pending": []}))
    common = ["--sources", str(sources), "--download-dir", str(downloads), "--json"]
    for registry in ("first", "second"):
        out = run("sync", "--registry", str(tmp_path / registry), *common)
        assert out.returncode == 0, out.stderr
        added = json.loads(out.stdout)["mine"]["ingest"]["added"]
        assert [Path(a["path"]).name for a in added] == ["one.safetensors"], registry
        assert (tmp_path / registry / "sync" / "mine.cursor.json").is_file()
    again = json.loads(run("sync", "--registry", str(tmp_path / "first"), *common).stdout)["mine"]
    assert again["discovered"] == 0 and again["ingest"] is None


def test_a_file_rejected_for_an_unknown_base_is_retried_once_the_base_is_registered(tmp_path):
    """Rejections that registering a base can undo (``unknown_base``) are not kept as seen; a file
    that no registration can change (a .ckpt) is not retried."""
    from flux_fixtures import tiny_flux_base

    from registry import Registry

    base = tiny_flux_base()
    folder = tmp_path / "loras"
    folder.mkdir()
    save_lora(folder / "tiny.safetensors", flux_lora(list(base.layer_shapes)[:4], rank=2, base=base), "diffusers")
    (folder / "old.ckpt").write_bytes(b"\x80\x04K\x01.")
    registry = tmp_path / "registry"
    common = ["--registry", str(registry), "--sources", str(_sources(tmp_path, ("mine", "loras"))),
              "--download-dir", str(tmp_path / "downloads"), "--json"]
    first = json.loads(run("sync", *common).stdout)["mine"]
    assert {Path(r["path"]).name: r["code"] for r in first["ingest"]["rejected"]} == {
        "tiny.safetensors": "unknown_base", "old.ckpt": "unsupported_extension"}
    Registry.open(registry).register_base(base)
    second = json.loads(run("sync", *common).stdout)["mine"]
    assert second["discovered"] == 1 and second["ingest"]["rejected"] == []
    assert [Path(a["path"]).name for a in second["ingest"]["added"]] == ["tiny.safetensors"]
    third = json.loads(run("sync", *common).stdout)["mine"]
    assert third["discovered"] == 0 and third["ingest"] is None


def test_a_missing_local_folder_is_one_line_and_exit_1_after_the_other_sources(tmp_path):
    folder = tmp_path / "loras"
    folder.mkdir()
    save_lora(folder / "one.safetensors", flux_lora(partial_names((1,), ()), rank=2, seed=1), "kohya")
    sources = _sources(tmp_path, ("gone", "nowhere"), ("mine", "loras"))
    out = run("sync", "--registry", str(tmp_path / "registry"), "--sources", str(sources),
              "--download-dir", str(tmp_path / "downloads"))
    assert out.returncode == 1, out.stderr
    lines = out.stderr.strip().splitlines()
    assert lines == [f"warning: gone: folder {tmp_path / 'nowhere'} does not exist; create it, or set this "
                     f"source's folder in {sources}"], out.stderr
    from registry import Registry

    assert len(Registry.open(tmp_path / "registry", create=False)) == 1  # the other source was synced


def test_sync_lifts_only_the_clis_own_offline_default(monkeypatch):
    """`autolora` sets HF_HUB_OFFLINE=1 when the user did not; `sync` (an explicit download) lifts
    that default, but never an HF_HUB_OFFLINE the user set."""
    import huggingface_hub.constants as hf_constants

    import pipelines.cli_sources as cli_sources

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(cli_sources, "OFFLINE_BY_USER", True)
    cli_sources._online()
    assert hf_constants.HF_HUB_OFFLINE is True and os.environ["HF_HUB_OFFLINE"] == "1"
    monkeypatch.setattr(cli_sources, "OFFLINE_BY_USER", False)
    cli_sources._online()
    assert hf_constants.HF_HUB_OFFLINE is False and os.environ["HF_HUB_OFFLINE"] == "0"


def test_one_sources_unforeseen_failure_is_its_warning_and_the_others_sync(tmp_path, monkeypatch, capsys):
    import pipelines.sources.sync as sync_module
    from pipelines.cli import main

    monkeypatch.setattr("pipelines.cli_sources.OFFLINE_BY_USER", True)  # in process: leave HF_HUB_OFFLINE alone
    for name in ("first", "second"):
        (tmp_path / name).mkdir()
        save_lora(tmp_path / name / f"{name}.safetensors", flux_lora(partial_names((len(name),), ()), rank=2,
                                                                     seed=len(name)), "kohya")
    (tmp_path / "sources.toml").write_text("".join(f'[[source]]\nkind = "local"\nname = "{n}"\nfolder = "{n}"\n\n'
                                                   for n in ("first", "second")))
    real = sync_module.sync

    def first_breaks(source, *args, **kwargs):
        if source.name == "first":
            raise RecursionError("maximum recursion depth exceeded")
        return real(source, *args, **kwargs)

    monkeypatch.setattr(sync_module, "sync", first_breaks)
    code = main(["sync", "--registry", str(tmp_path / "registry"), "--sources", str(tmp_path / "sources.toml"),
                 "--download-dir", str(tmp_path / "downloads")])
    out, err = capsys.readouterr()
    assert code == 1
    assert "first: listing failed: internal_error: internal error (please report): RecursionError" in err
    from registry import Registry

    assert len(Registry.open(tmp_path / "registry", create=False)) == 1  # the second source's LoRA


def test_a_local_source_names_what_it_walked_past(tmp_path, monkeypatch, capsys):
    from pipelines.cli import main

    monkeypatch.setattr("pipelines.cli_sources.OFFLINE_BY_USER", True)
    folder = tmp_path / "loras"
    folder.mkdir()
    save_lora(folder / "good.safetensors", flux_lora(partial_names((3,), ()), rank=2, seed=3), "kohya")
    (folder / "gone.safetensors").symlink_to(tmp_path / "nowhere.safetensors")
    os.mkfifo(folder / "pipe.safetensors")
    (tmp_path / "sources.toml").write_text('[[source]]\nkind = "local"\nname = "mine"\nfolder = "loras"\n')
    common = ["sync", "--registry", str(tmp_path / "registry"), "--sources", str(tmp_path / "sources.toml"),
              "--download-dir", str(tmp_path / "downloads")]
    assert main([*common, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)["mine"]
    assert len(report["ingest"]["added"]) == 1
    assert sorted(report["warnings"]) == [f"skipped {folder / 'gone.safetensors'}: a symlink that is dangling or loops",
                                          f"skipped {folder / 'pipe.safetensors'}: neither a regular file nor a folder"]
    assert main(common) == 0  # the table, and each skipped path on stderr
    assert f"warning: mine: skipped {folder / 'pipe.safetensors'}" in capsys.readouterr().err
