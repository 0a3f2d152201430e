"""A text encoder that cannot be loaded: :class:`TextEncoderNotFound` with one line saying why, which
``autolora train encoder`` turns into a usage error (exit 2) instead of a transformers traceback."""

from __future__ import annotations

import sys
from pathlib import Path

import huggingface_hub.constants
import pytest

from models.text_encoder import TextEncoderNotFound, load_text_encoder

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "registry"))
from flux_fixtures import flux_lora, partial_names  # noqa: E402

MISSING_ID = "autolora-tests/no-such-model"  # a valid Hub id that is in no cache


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.mark.parametrize("spec", [f"clip:{MISSING_ID}", MISSING_ID])
def test_hub_id_not_cached_while_offline(offline, spec):
    with pytest.raises(TextEncoderNotFound) as caught:
        load_text_encoder(spec)
    message = str(caught.value)
    assert MISSING_ID in message and "HF_HUB_OFFLINE is on (set HF_HUB_OFFLINE=0" in message
    assert "\n" not in message


@pytest.mark.parametrize("spec", ["clip:./no/such/pipeline", "./no/such/model"])
def test_neither_folder_nor_hub_id(spec):
    with pytest.raises(TextEncoderNotFound, match="no such folder, and not a Hugging Face Hub repo id"):
        load_text_encoder(spec)


def test_folder_that_is_no_clip_pipeline(tmp_path):
    with pytest.raises(TextEncoderNotFound, match="in the folder"):
        load_text_encoder(f"clip:{tmp_path}")


@pytest.fixture
def two_lora_registry(tmp_path) -> Path:
    from pipelines import cli
    from registry.lora.formats import save_lora

    folder = tmp_path / "loras"
    folder.mkdir()
    for seed in (1, 2):
        save_lora(folder / f"l{seed}.safetensors", flux_lora(partial_names((seed,), (), attention_only=True),
                                                             seed=seed), "diffusers")
    registry = tmp_path / "registry"
    assert cli.main(["-v", "ingest", str(folder), "--registry", str(registry), "--json"]) == 0
    return registry


@pytest.mark.parametrize("args", [["--probes-from", MISSING_ID, "--text-encoder", "clip"],
                                  ["--text-encoder", MISSING_ID]])
def test_cli_train_encoder_usage_error(offline, two_lora_registry, capsys, args):
    from pipelines import cli

    capsys.readouterr()
    code = cli.main(["-v", "train", "encoder", "--registry", str(two_lora_registry), "--base-model", "FLUX.1-dev",
                     "--steps", "1", *args])
    err = capsys.readouterr().err
    assert code == 2
    line = next(line for line in err.splitlines() if line.startswith("autolora train: --text-encoder: "))
    assert MISSING_ID in line and "HF_HUB_OFFLINE=0" in line and "Traceback" not in err


def _hub_error(kind, message: str) -> OSError:
    """An OSError raised from ``kind`` as diffusers raises it ('not fully cached' ... from the Hub's error)."""
    from types import SimpleNamespace

    try:
        try:
            raise kind(message, response=SimpleNamespace(headers={}, status_code=401, request=None, url="u"))
        except Exception as cause:
            raise OSError("Cannot load model acme/x: the model is not fully cached locally and outgoing traffic "
                          "has been disabled") from cause
    except OSError as error:
        return error


def test_the_hubs_own_reason_is_said_not_the_wrappers(monkeypatch):
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    from models.text_encoder import hub_load_failure

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    gated = hub_load_failure("base", "acme/x", _hub_error(GatedRepoError, "401 Cannot access gated repo"))
    assert "gated Hub repo" in gated and "HF_TOKEN" in gated and "outgoing traffic" not in gated
    missing = hub_load_failure("base", "acme/x", _hub_error(RepositoryNotFoundError, "404 Repository Not Found"))
    assert "Repository Not Found" in missing and "outgoing traffic" not in missing
