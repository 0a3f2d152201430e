"""The evaluation commands refuse, before any work, a report folder they cannot write (a file, a
folder under a file, a folder the process cannot create files in) and a world whose LoRAs the
registry does not hold: one line, exit 2, nothing trained or written."""

from __future__ import annotations

import pytest

from pipelines.cli import main
from registry import Registry

UNWRITABLE = "/sys/kernel/autolora-report"  # sysfs: no file can be created there, even by root


def _run(capsys, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    err = capsys.readouterr().err
    return code, err


@pytest.mark.parametrize("command", ["fusion", "generation", "retrieval"])
def test_an_unwritable_report_folder_is_a_usage_error_before_any_work(command, micro_world, micro_registry,
                                                                       tmp_path, capsys):
    a_file = tmp_path / "report.txt"
    a_file.write_text("not a folder")
    registry = [] if command == "fusion" else ["--registry", str(micro_registry.root)]
    gates_before = sorted((micro_world / "gates").glob("*")) if (micro_world / "gates").exists() else []
    for out, why in ((a_file, "is a file, not a folder"), (a_file / "sub", "is a file, not a folder"),
                     (UNWRITABLE, "cannot write in /sys/kernel")):
        code, err = _run(capsys, "eval", command, "--world", str(micro_world), *registry, "--out", str(out), "--json")
        assert code == 2 and err.count("\n") == 1 and why in err, err
        assert err.startswith(f"autolora eval: --out {out}: "), err
    gates_after = sorted((micro_world / "gates").glob("*")) if (micro_world / "gates").exists() else []
    assert gates_after == gates_before


def test_generation_on_a_world_the_registry_does_not_hold_is_refused_before_training_gates(
        micro_world, tmp_path, capsys):
    empty = Registry.open(tmp_path / "registry")  # created, empty
    gates = micro_world / "gates"
    before = sorted(gates.glob("*")) if gates.exists() else []
    code, err = _run(capsys, "eval", "generation", "--registry", str(empty.root), "--world", str(micro_world),
                     "--out", str(tmp_path / "out"), "--json")
    assert code == 2 and err.count("\n") == 1 and "ingest the world first" in err, err
    assert (sorted(gates.glob("*")) if gates.exists() else []) == before
    assert not (tmp_path / "out").exists()


def test_an_unknown_fusion_method_is_a_usage_error_before_any_work(micro_world, tmp_path, capsys):
    code, err = _run(capsys, "eval", "fusion", "--world", str(micro_world), "--methods", "linear", "gated_papr",
                     "--out", str(tmp_path / "out"), "--json")
    assert code == 2 and err.count("\n") == 1 and "unknown method 'gated_papr'" in err and "gated_paper" in err, err
    assert not (tmp_path / "out").exists()
