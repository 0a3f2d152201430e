"""Whether a string has the form of a Hugging Face Hub repo id (``name`` or ``owner/name``).

Callers check for an existing local path first (and decide what such a path means to them): this
only judges the form, offline, with ``huggingface_hub``'s own validator.
"""

from __future__ import annotations


def looks_like_hub_repo_id(text: str, *, owner_required: bool = False) -> bool:
    """Whether ``text`` is a valid Hub repo id: ``name`` or ``owner/name`` (only ``owner/name`` when
    ``owner_required``). Paths such as ``/abs/dir``, ``./dir``, ``~/dir`` or ``a/b/c`` are not."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if not isinstance(text, str) or (owner_required and text.count("/") != 1):
        return False
    try:
        validate_repo_id(text)  # at most one "/", [\w.-] only, no leading/trailing "." or "-", no "--"/"..", ≤ 96
    except HFValidationError:
        return False
    return True
