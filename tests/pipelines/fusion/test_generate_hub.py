"""``autolora generate --base OWNER/NAME`` downloads its base pipeline from a Hub, for real.

The micro demo world's base (a diffusers ``FluxPipeline.save_pretrained`` folder) is mirrored as the
Hub model repo ``autolora-test/tiny-flux`` (weights as LFS objects) in the real ``olah`` mirror
(``tests/hub_mirror.py``), and the CLI runs as a user runs it against black-forest-labs/FLUX.1-dev:
a subprocess of the installed ``autolora`` script with ``HF_ENDPOINT`` at olah, ``HF_HUB_OFFLINE=0``
and an empty ``HF_HOME``. The text encoders by Hub id (``load_text_encoder``: a sentence-transformers
id, ``clip:<pipeline id>``) come through the same mirror. Skipped when olah's venv is missing.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipelines.registry_gates import base_weights_id

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from hub_mirror import folder_files, running_olah  # noqa: E402

HUB_BASE = "autolora-test/tiny-flux"
HUB_MINILM = "autolora-test/all-MiniLM-L6-v2"
MISSING = "autolora-test/no-such-base"  # a valid repo id the mirror does not have
AUTOLORA = Path(sys.executable).with_name("autolora")  # the console script installed beside this Python
PROMPT = "a red circle"
BASE_CARD = ("---\nlibrary_name: diffusers\npipeline_tag: text-to-image\nlicense: mit\n---\n"
             "# tiny FLUX\n\nThe autolora micro demo world's base pipeline.\n")
WHEN = "2025-01-01T00:00:00"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _env(hf_home: Path, endpoint: str | None) -> dict[str, str]:
    """This environment without any Hugging Face setting (cache, endpoint, token, offline flags),
    with ``hf_home`` as ``HF_HOME`` and the Hub at ``endpoint`` (``None``: ``HF_HUB_OFFLINE=1``)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("HF_", "HUGGING", "TRANSFORMERS_", "SENTENCE_TRANSFORMERS_"))}
    env.update(HF_HOME=str(hf_home), OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env.update({"HF_ENDPOINT": endpoint, "HF_HUB_OFFLINE": "0"} if endpoint else {"HF_HUB_OFFLINE": "1"})
    return env


def _run(args: list[str], hf_home: Path, endpoint: str | None, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(args, env=_env(hf_home, endpoint), cwd=cwd, capture_output=True, text=True, timeout=600)


def _generate(base: str, out: Path, registry, size: int, hf_home: Path, endpoint: str | None):
    assert AUTOLORA.is_file(), f"the autolora script is not installed beside {sys.executable}"
    return _run([str(AUTOLORA), "generate", PROMPT, "--base", base, "--registry", str(registry.root), "-k", "1",
                 "-o", str(out), "--seed", "0", "--size", str(size), "--json"], hf_home, endpoint, out.parent)


def _smallest_size(base: Path) -> int:
    """The smallest image size the base renders: 2 * its VAE's scale factor (as FluxPipeline checks)."""
    vae = json.loads((base / "vae" / "config.json").read_text())
    return 2 * 2 ** (len(vae["block_out_channels"]) - 1)


@pytest.fixture(scope="module")
def hub(micro_world, tmp_path_factory):
    """olah serving the micro world's base as ``HUB_BASE``: (the server, the repo's commit)."""
    with running_olah(tmp_path_factory.mktemp("hub") / "olah") as server:
        yield server, server.add(HUB_BASE, folder_files(micro_world / "base"), BASE_CARD, WHEN)


def test_generate_downloads_a_hub_base_and_renders_as_the_local_folder(hub, micro_world, micro_registry, tmp_path):
    server, commit = hub
    size = _smallest_size(micro_world / "base")
    hub_home, local_home = tmp_path / "hf-hub", tmp_path / "hf-local"

    got = _generate(HUB_BASE, tmp_path / "hub.png", micro_registry, size, hub_home, server.url)
    assert got.returncode == 0, f"{got.stderr[-4000:]}\n--- olah:\n{server.log_tail()}"
    local = _generate(str(micro_world / "base"), tmp_path / "local.png", micro_registry, size, local_home, None)
    assert local.returncode == 0, local.stderr[-4000:]

    # the whole pipeline came through the Hub cache: a snapshot of the mirror's commit, every file the
    # local folder has, byte for byte, the weights stored as LFS blobs under their sha256
    cache = hub_home / "hub" / f"models--{HUB_BASE.replace('/', '--')}"
    assert (cache / "refs" / "main").read_text() == commit
    snapshot = cache / "snapshots" / commit
    files = folder_files(micro_world / "base")
    assert any(name.endswith(".safetensors") for name in files)
    for name, data in files.items():
        assert (snapshot / name).is_file() and (snapshot / name).read_bytes() == data, name
        if name.endswith(".safetensors"):
            assert (cache / "blobs" / _sha256(data)).is_file(), name
    assert not list(local_home.glob("hub/models--*"))  # the local run needed no Hub
    # gates trained on the Hub id are found for the local folder (and back): same weight files, same identity
    # (and auto keeps a downloaded Hub base in the precision its weights are stored in, as a folder)
    identity = [sys.executable, "-c", "import sys; from pipelines.registry_gates import base_weights_id as w; "
                "from pipelines.generate import stored_dtype as s; print(w(sys.argv[1]), s(sys.argv[1]))", HUB_BASE]
    cached = _run(identity, hub_home, None, tmp_path)
    assert cached.stdout.split() == [base_weights_id(str(micro_world / "base")), "torch.float32"], cached.stderr[-2000:]
    assert _run(identity, local_home, None, tmp_path).stdout.split() == ["None", "None"]  # not downloaded there

    # the same render: same retrieved LoRA, same pixels
    hub_info, local_info = json.loads(got.stdout), json.loads(local.stdout)
    assert hub_info["loras"] == local_info["loras"] and len(hub_info["loras"]) == 1
    assert hub_info["prompt"] == local_info["prompt"]
    hub_image, local_image = Image.open(tmp_path / "hub.png"), Image.open(tmp_path / "local.png")
    assert hub_image.size == local_image.size == (size, size)
    difference = np.abs(np.asarray(hub_image, dtype=np.int16) - np.asarray(local_image, dtype=np.int16)).max()
    assert difference <= 1, f"the Hub base renders other pixels (max difference {difference})"
    assert np.asarray(hub_image).std() > 0  # an image, not a blank

    # downloaded once, the Hub base renders offline (HF_HUB_OFFLINE=1) the same, with no word about the Hub
    offline = _generate(HUB_BASE, tmp_path / "offline.png", micro_registry, size, hub_home, None)
    assert offline.returncode == 0, offline.stderr[-4000:]
    assert "Could not reach the Hub" not in offline.stderr, offline.stderr
    assert np.array_equal(np.asarray(Image.open(tmp_path / "offline.png")), np.asarray(hub_image))


def test_a_hub_id_the_hub_does_not_have_is_a_one_line_usage_error(hub, micro_registry, tmp_path):
    server, _ = hub
    got = _generate(MISSING, tmp_path / "x.png", micro_registry, 16, tmp_path / "hf", server.url)
    assert got.returncode == 2, got.stderr[-4000:]
    assert got.stderr.startswith(f"autolora generate: cannot load the base '{MISSING}': no such folder, and the "
                                 "Hugging Face Hub could not provide it (")
    assert got.stderr.count("\n") == 1 and "Traceback" not in got.stderr
    assert not (tmp_path / "x.png").exists()


TEXT_ENCODERS = """
import json, sys
import numpy as np
from models.text_encoder import load_text_encoder

texts = ["a red circle on a dotted background", "ohwx yllw, a star"]
report = {}
for name, (hub_spec, local_spec) in json.loads(sys.argv[1]).items():
    hub, local = load_text_encoder(hub_spec), load_text_encoder(local_spec)
    report[name] = {"hub": type(hub).__name__, "name": hub.name, "dim": hub.dim,
                    "difference": float(np.abs(hub.encode(texts) - local.encode(texts)).max())}
print(json.dumps(report))
"""


def test_text_encoders_load_by_hub_id(hub, micro_world, tmp_path):
    """A sentence-transformers id (the bundled all-MiniLM-L6-v2, mirrored) and ``clip:<pipeline id>``
    (the tiny base's CLIP) load through the Hub and embed as their local copies do."""
    from models.text_encoder import default_model_path

    server, commit = hub
    minilm = default_model_path()
    weights = folder_files(minilm)
    minilm_commit = server.add(HUB_MINILM, {k: v for k, v in weights.items() if k != "README.md"},
                               (minilm / "README.md").read_text(encoding="utf-8"), WHEN)
    specs = {"minilm": [HUB_MINILM, None], "clip": [f"clip:{HUB_BASE}", f"clip:{micro_world / 'base'}"]}
    hf_home = tmp_path / "hf"
    got = _run([sys.executable, "-c", TEXT_ENCODERS, json.dumps(specs)], hf_home, server.url, tmp_path)
    assert got.returncode == 0, f"{got.stderr[-4000:]}\n--- olah:\n{server.log_tail()}"
    report = json.loads(got.stdout.strip().splitlines()[-1])

    assert report["minilm"]["hub"] == "TextEncoder" and report["minilm"]["name"] == HUB_MINILM  # sentence-transformers
    assert report["minilm"]["dim"] == 384 and report["minilm"]["difference"] < 1e-5  # = the bundled numpy encoder
    assert report["clip"]["hub"] == "CLIPTextEncoder" and report["clip"]["name"] == f"clip:{HUB_BASE}"
    assert report["clip"]["difference"] < 1e-6
    hub_cache = hf_home / "hub"
    snapshot = hub_cache / f"models--{HUB_MINILM.replace('/', '--')}" / "snapshots" / minilm_commit
    assert (snapshot / "model.safetensors").read_bytes() == weights["model.safetensors"]
    clip = hub_cache / f"models--{HUB_BASE.replace('/', '--')}" / "snapshots" / commit / "text_encoder"
    local_clip = micro_world / "base" / "text_encoder"
    assert (clip / "model.safetensors").read_bytes() == (local_clip / "model.safetensors").read_bytes()
    shutil.rmtree(hf_home)  # ~90 MB each: the MiniLM in the Hub cache and in the mirror
    shutil.rmtree(server.mirrors / "models" / HUB_MINILM)


def test_register_base_by_hub_id_reads_only_the_transformer_config(hub, micro_world, tmp_path):
    """``autolora register-base OWNER/NAME`` registers the Hub pipeline's base under its id, from its
    ``transformer/config.json`` alone (no weights downloaded); offline and not cached, or a repo the Hub
    does not have, is a one-line usage error that writes nothing."""
    server, commit = hub
    hf_home, registry = tmp_path / "hf", tmp_path / "registry"
    register = [str(AUTOLORA), "register-base", HUB_BASE, "--registry", str(registry), "--json"]

    offline = _run(register, hf_home, None, tmp_path)
    assert offline.returncode == 2 and offline.stderr.count("\n") == 1, offline.stderr
    assert "not in the local Hugging Face cache" in offline.stderr and "HF_HUB_OFFLINE=0" in offline.stderr
    assert not registry.exists()

    got = _run(register, hf_home, server.url, tmp_path)
    assert got.returncode == 0, f"{got.stderr[-4000:]}\n--- olah:\n{server.log_tail()}"
    described = json.loads((micro_world / "base_model.json").read_text())
    assert json.loads(got.stdout) == {"name": HUB_BASE, "architecture": "flux",
                                      "layers": len(described["layer_shapes"]), "already_registered": False}
    snapshot = hf_home / "hub" / f"models--{HUB_BASE.replace('/', '--')}" / "snapshots" / commit
    assert sorted(str(p.relative_to(snapshot)) for p in snapshot.rglob("*") if p.is_file()) == [
        "transformer/config.json"]
    again = _run(register, hf_home, None, tmp_path)  # cached now: offline is enough, and nothing changes
    assert again.returncode == 0 and json.loads(again.stdout)["already_registered"] is True, again.stderr

    missing = _run([*register[:2], MISSING, *register[3:]], hf_home, server.url, tmp_path)
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1, missing.stderr
    assert f"'{MISSING}'" in missing.stderr and "Traceback" not in missing.stderr
    print(f"\n{offline.stderr}{missing.stderr}")
