"""The LanceDB side of the registry: opening, tables, upserts, versions and tags, reads.

A registry is a folder holding ``registry.json`` (its marker and format version), a LanceDB
database (``lancedb/``: tables ``loras``, ``files``, ``rejections`` and ``encoders``), a
content-addressed blob store (``blobs/``) and the LoRA-weight encoders' checkpoints
(``encoders/``). Reading never creates anything: a folder without the marker is refused.
A view pinned to a version or a tag pins every table and never writes.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable, Sequence
from datetime import timedelta
from pathlib import Path

import lancedb
import pyarrow as pa
from lancedb.index import FTS

from registry.atomic_write import cannot_create_in, is_temp_file_of, write_atomically
from registry.store.blobstore import BlobStore
from registry.store.schema import (
    ENCODERS_SCHEMA, FILES_SCHEMA, FORMAT_VERSION, FULL_TEXT_COLUMN, REJECTIONS_SCHEMA, TEXT_DIM,
    WEIGHT_COLUMNS, loras_schema,
)

MARKER = "registry.json"
# name -> (schema, primary key)
TABLES: dict[str, tuple[pa.Schema, str]] = {
    "loras": (loras_schema(TEXT_DIM), "lora_id"),
    "files": (FILES_SCHEMA, "path"),
    "rejections": (REJECTIONS_SCHEMA, "rejection_id"),
    "encoders": (ENCODERS_SCHEMA, "version"),
}
MIGRATABLE = (2,)  # formats a writable open upgrades in place (v2 -> v3: add the weight columns)
_PRIMARY_KEY_MARK = b"lance-schema:unenforced-primary-key:position"  # in the key field's metadata
# A write that conflicts with another process's commit is retried by LanceDB itself
# (merge_insert rebases and retries); this bounds the time it may spend doing so.
WRITE_TIMEOUT = timedelta(seconds=120)


class RegistryNotFound(FileNotFoundError):
    """The folder holds no autolora registry (or one this version cannot read)."""


class VersionNotFound(RegistryNotFound):
    """The registry is there; the version number or tag asked of it is not."""


class RegistryNotWritable(PermissionError):
    """This process cannot write into the registry's folders (a read-only mount, permissions)."""


def user_path(path: str | os.PathLike) -> Path:
    """A path as a user typed it: ``~`` and ``$VARS`` expanded."""
    return Path(os.path.expandvars(os.path.expanduser(os.fspath(path))))


def quote(value: str) -> str:
    """A SQL string literal."""
    return "'" + value.replace("'", "''") + "'"


def where_in(column: str, values: Iterable[str]) -> str:
    """``column IN ('a', 'b')`` (a SQL filter)."""
    return f"{column} IN ({', '.join(quote(v) for v in values)})"


def _ranges(numbers: Iterable[int]) -> str:
    """``1-4, 7, 9-12``: sorted numbers, runs joined (a table's versions, for error messages)."""
    runs: list[list[int]] = []
    for n in sorted(numbers):
        if runs and n == runs[-1][1] + 1:
            runs[-1][1] = n
        else:
            runs.append([n, n])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs) or "none"


def _read_format(root: Path) -> int | None:
    try:
        return json.loads((root / MARKER).read_text(encoding="utf-8")).get("format")
    except (OSError, ValueError, AttributeError) as error:
        raise RegistryNotFound(f"{root}: unreadable {MARKER}: {error}") from None


def holds_registry(folder: Path) -> bool:
    """Whether ``folder`` is an autolora registry's root (its marker names a format)."""
    try:
        return isinstance(_read_format(folder), int)
    except RegistryNotFound:  # no marker, or an unreadable one
        return False


def _check_marker(root: Path, writable: bool) -> None:
    found = _read_format(root)
    if found == FORMAT_VERSION or (writable and found in MIGRATABLE):
        return
    hint = "open it for writing once to upgrade it" if found in MIGRATABLE else "ingest into a new folder"
    raise RegistryNotFound(f"{root} is an autolora registry of format {found}; this version "
                           f"reads format {FORMAT_VERSION}: {hint}")


def _write_marker(root: Path) -> None:
    write_atomically(root / MARKER, json.dumps({"format": FORMAT_VERSION}))  # concurrent writers write the same


def _create_root(root: Path) -> None:
    if root.exists() and not root.is_dir():
        raise RegistryNotFound(f"{root} is a file, not a registry folder")
    if (root.is_dir() and any(p.name != MARKER and not is_temp_file_of(p.name, MARKER) for p in root.iterdir())
            and not (root / MARKER).is_file()):  # (a process creating it now writes the marker before the rest)
        raise RegistryNotFound(f"{root} exists and holds no autolora registry ({MARKER} is missing); "
                               "give a new or empty folder")
    root.mkdir(parents=True, exist_ok=True)
    _write_marker(root)


def _index_new_table(name: str, table) -> None:
    """The LoRA table's full-text index, made with the table (empty: a few ms) so that no
    ingest makes it; rows added later are searched unindexed until maintenance folds them in.
    Left to a later ingest (``maintenance.ensure_indexes``) if a concurrent process raced us."""
    if name == "loras":
        try:
            table.create_index(FULL_TEXT_COLUMN, config=FTS(), name=f"{FULL_TEXT_COLUMN}_idx")
        except (RuntimeError, OSError, ValueError):
            pass


class Store:
    """The tables of one registry folder. Open with :meth:`open`."""

    def __init__(self, root: Path, version: int | str | None = None) -> None:
        self.root = root
        self.blobs = BlobStore(root / "blobs", create=version is None)
        self.read_only = version is not None
        self.db = lancedb.connect(root / "lancedb", read_consistency_interval=timedelta(0))
        if self.read_only:
            try:
                tables = {name: self.db.open_table(name) for name in TABLES}
            except (ValueError, FileNotFoundError) as error:
                raise RegistryNotFound(f"{root}: the registry has no tables yet ({error})") from None
        else:
            tables = {name: self._create_table(name, *spec) for name, spec in TABLES.items()}
            self._upgrade(tables["loras"])
        self.loras, self.files, self.rejections = tables["loras"], tables["files"], tables["rejections"]
        self.encoders = tables["encoders"]
        if isinstance(version, str) and version.isascii() and version.isdigit() and (
                version not in self.loras.tags.list()):
            version = int(version)  # "12" (a command line's) is version 12, unless a tag has that name
        self.pinned: int | str | None = version
        if version is not None:
            self._pin(version)

    @classmethod
    def open(cls, path: str | os.PathLike, version: int | str | None = None, *, create: bool = True):
        """Open the registry at ``path`` (``~`` and ``$VARS`` expanded).

        ``version`` (a number or a tag; a string of digits that names no tag is a number) gives a
        read-only view of every table as it was then.
        ``create`` makes a new registry where the folder is missing or empty; reading callers
        pass ``create=False`` and get :class:`RegistryNotFound` instead.
        """
        root = user_path(path)
        if not (root / MARKER).is_file():
            if version is not None or not create:
                raise RegistryNotFound(f"{root} holds no autolora registry ({MARKER} is missing)")
            _create_root(root)
        _check_marker(root, writable=version is None)
        return cls(root, version)

    def _upgrade(self, loras) -> None:
        """Format 2 -> 3: the LoRA table gains the columns it lacks (null); then the marker says 3."""
        have = set(loras.schema.names)
        missing = [f for f in WEIGHT_COLUMNS if f.name not in have]
        if missing:
            loras.add_columns(missing)
        if _read_format(self.root) != FORMAT_VERSION:
            _write_marker(self.root)

    def _create_table(self, name: str, schema: pa.Schema, key: str):
        try:
            table = self.db.open_table(name)
        except ValueError:  # not created yet
            try:
                table = self.db.create_table(name, schema=schema)
            except (ValueError, RuntimeError) as error:  # created by a concurrent process meanwhile ("already
                try:  # exists", or a commit conflict with its create): then it can be opened
                    table = self.db.open_table(name)
                except ValueError:
                    raise error from None
            else:
                _index_new_table(name, table)
        for attempt in range(5):
            if _PRIMARY_KEY_MARK in (table.schema.field(key).metadata or {}):
                break
            try:
                table.set_unenforced_primary_key(key)
                break
            except (RuntimeError, ValueError):  # another process creating the registry set it first (a
                time.sleep(0.02 * (attempt + 1))  # conflicting transaction, or "already set"): looked at again
                table = self.db.open_table(name)
        else:
            raise RegistryNotWritable(f"{self.root}: could not mark {key!r} as the key of the {name} table")
        return table

    def _tables(self) -> dict[str, object]:
        return {"loras": self.loras, "files": self.files, "rejections": self.rejections,
                "encoders": self.encoders}

    def _pin(self, version: int | str) -> None:
        """Check out every table as of ``version`` of the LoRA table (or tag ``version`` where a
        table carries it; otherwise its last version committed before the LoRA table's next one:
        an ingest writes its LoRA rows first, then their file records)."""
        listed, tags = self.loras.list_versions(), self.loras.tags.list()
        versions = [v["version"] for v in listed]
        known = f"versions: {_ranges(versions)}, tags: {', '.join(sorted(tags)) or 'none'}"
        if version not in (tags if isinstance(version, str) else versions):
            what = f"tag {version!r}" if isinstance(version, str) else f"version {version}"
            raise VersionNotFound(f"{self.root} has no {what}; {known}")
        try:
            self.loras.checkout(version)
        except (ValueError, RuntimeError, OSError) as error:  # listed, but its files are gone (cleaned up)
            raise VersionNotFound(f"{self.root}: version {version!r} cannot be read ({error}); {known}") from None
        later = [v["timestamp"] for v in listed if v["version"] > self.loras.version]
        until = min(later) if later else None
        for name, table in self._tables().items():
            if name == "loras":
                continue
            if isinstance(version, str) and version in table.tags.list():
                table.checkout(version)
                continue
            older = [v["version"] for v in table.list_versions() if until is None or v["timestamp"] < until]
            table.checkout(max(older) if older else 1)

    def _writable(self) -> None:
        if self.read_only:
            raise PermissionError("this registry view is pinned to a version; open it without one to write")

    def check_writable(self) -> None:
        """Raise :class:`RegistryNotWritable` unless a file can be created in the blob store and
        the tables' folder (tried: permission bits do not bind root), before a write starts."""
        self._writable()
        for folder in (self.blobs.root, self.root / "lancedb"):
            why = cannot_create_in(folder)
            if why:
                raise RegistryNotWritable(f"cannot write to the registry at {self.root}: {folder} ({why})")

    # ---- writes ------------------------------------------------------------------------
    def upsert(self, table, rows: Sequence[dict], key: str, *, update: bool) -> int:
        """One batched upsert keyed by ``key`` (one table version); ``update=False`` keeps the
        row already stored. Conflicts with concurrent writers are retried by LanceDB. Returns
        how many rows were inserted (not updated or kept)."""
        self._writable()
        if not rows:
            return 0
        data = pa.Table.from_pylist(list(rows), schema=table.schema)
        builder = table.merge_insert(key)
        if update:
            builder = builder.when_matched_update_all()
        # a row without a weight vector (no encoder for its base yet) keeps it null
        result = builder.when_not_matched_insert_all().execute(data, timeout=WRITE_TIMEOUT, on_bad_vectors="null")
        return result.num_inserted_rows

    def forget_rejections(self, paths: Sequence[str]) -> None:
        """Drop the rejections recorded for ``paths`` (each now holds a LoRA, or a new rejection):
        one table version, only when there are some."""
        self._writable()
        if not paths or not self.rejections.count_rows():
            return
        where = where_in("path", paths)
        if self.rejections.count_rows(where):
            self.rejections.delete(where)

    # ---- versions ----------------------------------------------------------------------
    @property
    def version(self) -> int:
        """The registry's version: that of its LoRA table."""
        return self.loras.version

    def tag(self, name: str, version: int | None = None) -> None:
        """Name the current state of every table (``version``: an older LoRA-table version,
        tagged on that table alone); moves the tag where it exists. A version that does not exist
        raises ``ValueError`` naming those that do."""
        self._writable()
        if not isinstance(name, str) or not name.strip() or name != name.strip():
            raise ValueError(f"a tag name must be a non-empty name without surrounding spaces, not {name!r}")
        if version is not None:
            versions = [v["version"] for v in self.loras.list_versions()]
            if version not in versions:
                raise ValueError(f"no version {version!r}; versions: {_ranges(versions)}")
        tables = self._tables() if version is None else {"loras": self.loras}
        for table in tables.values():
            at = table.version if version is None else version
            if name in table.tags.list():
                table.tags.update(name, at)
            else:
                table.tags.create(name, at)

    def tags(self) -> dict[str, int]:
        """Tag name -> LoRA-table version."""
        return {name: info["version"] for name, info in self.loras.tags.list().items()}

    # ---- reads -------------------------------------------------------------------------
    def rows(self, table, where: str, limit: int, columns: list[str] | None = None) -> list[dict]:
        """Rows of ``table`` matching a SQL filter (a scalar-indexed lookup where indexed)."""
        query = table.search().where(where)
        if columns:
            query = query.select(columns)
        return query.limit(limit).to_list()

    def column_rows(self, table, columns: list[str]) -> list[dict]:
        """Every row of ``table``, only ``columns`` read."""
        n = table.count_rows()
        return table.search().select(columns).limit(n).to_list() if n else []

    def get(self, lora_id: str) -> dict | None:
        """The full row of one LoRA (without its vectors), or ``None``."""
        rows = self.rows(self.loras, f"lora_id = {quote(lora_id)}", 1)
        if not rows:
            return None
        row = rows[0]
        row.pop("text_vector", None)
        row.pop("weight_vector", None)
        row["header_metadata"] = json.loads(row.get("header_metadata") or "{}")
        return row

    def lora_ids(self) -> list[str]:
        return [row["lora_id"] for row in self.column_rows(self.loras, ["lora_id"])]

    def paths_of(self, lora_id: str) -> list[dict]:
        """Every file record of a LoRA (one per path it was seen at)."""
        return self.rows(self.files, f"lora_id = {quote(lora_id)}", 1 << 16)

    def blob_path(self, lora_id: str) -> Path:
        """The stored file of a LoRA."""
        row = self.get(lora_id)
        if row is None:
            raise KeyError(lora_id)
        return self.root / row["blob"]

    def __len__(self) -> int:
        return self.loras.count_rows()
