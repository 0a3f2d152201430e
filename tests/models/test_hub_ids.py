"""models.hub_ids: the one test of "Hub repo id or not" that base pipelines, text encoders and vLLM share."""

from __future__ import annotations

from pathlib import Path

import pytest

from models.hub_ids import looks_like_hub_repo_id


@pytest.mark.parametrize("text", [
    "black-forest-labs/FLUX.1-dev", "Qwen/Qwen2.5-VL-7B-Instruct", "sentence-transformers/all-MiniLM-L6-v2",
    "gpt2", "a/b", "Foo-BAR_foo.bar123", "owner/" + "x" * 96,
])
def test_repo_ids(text):
    assert looks_like_hub_repo_id(text)


@pytest.mark.parametrize("text", [
    "", "/", "a/b/c", "datasets/owner/name", "/abs/folder", "/model", "./model", "../model", "~/model", "~",
    "owner/", "/name", "owner//name", ".hidden", "name.", "-name", "foo--bar", "foo..bar", "foo.git",
    "owner/name.git", "with space/name", "C:\\models\\flux", "x" * 97, "owner/x%y",
])
def test_not_repo_ids(text):
    assert not looks_like_hub_repo_id(text)
    assert not looks_like_hub_repo_id(text, owner_required=True)


def test_owner_required_needs_exactly_one_slash():
    assert looks_like_hub_repo_id("gpt2") and not looks_like_hub_repo_id("gpt2", owner_required=True)
    assert looks_like_hub_repo_id("openai/gpt2", owner_required=True)


def test_a_path_object_is_no_repo_id():
    assert not looks_like_hub_repo_id(Path("owner/name"))  # type: ignore[arg-type]  # as validate_repo_id says


def test_only_the_form_is_judged(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "owner" / "name").mkdir(parents=True)  # an existing local folder of that form
    assert looks_like_hub_repo_id("owner/name")  # callers check for local paths first
