"""Arrow schemas of the registry's LanceDB tables, and the on-disk format version."""

from __future__ import annotations

import pyarrow as pa

TEXT_DIM = 384  # all-MiniLM-L6-v2
FORMAT_VERSION = 3  # v2: files keyed by path with a stat cache, loras.removed; v3: weight vectors, encoders
WEIGHT_COLUMNS = (  # added by v3 (a v2 registry gains them, null, when opened for writing)
    pa.field("weight_vector", pa.list_(pa.float32(), TEXT_DIM)),  # the LoRA-weight encoder's embedding
    pa.field("encoder_version", pa.string()),  # the encoder that made it
    pa.field("licence", pa.string()),  # as its card or source states it
    pa.field("nsfw_level", pa.string()),
    pa.field("source_url", pa.string()),
    pa.field("caption_model", pa.string()),  # the model that wrote ``captions`` (``Registry.set_captions``)
)

FULL_TEXT_COLUMN = "search_text"  # of the LoRA table: its FTS index is made with the table
_TIME = pa.timestamp("us", tz="UTC")
_STRINGS = pa.list_(pa.string())


def loras_schema(text_dim: int = TEXT_DIM) -> pa.Schema:
    """One row per distinct LoRA (distinct canonical weights), keyed by ``lora_id``."""
    return pa.schema([
        pa.field("lora_id", pa.string(), nullable=False),
        pa.field("name", pa.string()),
        pa.field("description", pa.string()),
        pa.field("trigger_words", _STRINGS),
        pa.field("tags", _STRINGS),
        pa.field("architecture", pa.string()),
        pa.field("base_model", pa.string()),
        pa.field("format", pa.string()),
        pa.field("rank", pa.int32()),
        pa.field("layers", pa.int32()),
        pa.field("sha256", pa.string()),
        pa.field("fingerprint", pa.string()),
        pa.field("size_bytes", pa.int64()),
        pa.field("blob", pa.string()),
        pa.field("source_path", pa.string()),
        pa.field("render_prompts", _STRINGS),
        pa.field("render_blobs", _STRINGS),
        pa.field("captions", _STRINGS),
        pa.field("header_metadata", pa.string()),
        pa.field("search_text", pa.string()),
        pa.field("text_vector", pa.list_(pa.float32(), text_dim)),
        pa.field("added_at", _TIME),
        pa.field("removed", pa.bool_()),  # every known path of it is gone (``prune``)
        *WEIGHT_COLUMNS,
    ])


FILES_SCHEMA = pa.schema([
    pa.field("path", pa.string(), nullable=False),
    pa.field("sha256", pa.string()),
    pa.field("lora_id", pa.string()),
    pa.field("format", pa.string()),
    pa.field("size_bytes", pa.int64()),
    pa.field("mtime_ns", pa.int64()),
    pa.field("inode", pa.int64()),
    pa.field("sidecars", pa.string()),  # signature of the sidecar files seen beside it
    pa.field("seen_at", _TIME),
    pa.field("gone", pa.bool_()),  # the path no longer exists (``prune``)
])
"""Every accepted file seen, keyed by its resolved path (several paths can hold one file, several
files one LoRA). Size, mtime and inode are the stat cache: an unchanged file is not hashed again."""

REJECTIONS_SCHEMA = pa.schema([
    pa.field("rejection_id", pa.string(), nullable=False),
    pa.field("path", pa.string()),
    pa.field("sha256", pa.string()),
    pa.field("code", pa.string()),
    pa.field("reason", pa.string()),
    pa.field("rejected_at", _TIME),
])
"""Every refused file with its reason, keyed by hash(path, sha256)."""

ENCODERS_SCHEMA = pa.schema([
    pa.field("version", pa.string(), nullable=False),
    pa.field("base_model", pa.string()),
    pa.field("file", pa.string()),  # relative to the registry root
    pa.field("created_at", _TIME),
    pa.field("info", pa.string()),  # json: training pool, config, loss, ...
    pa.field("active", pa.bool_()),  # the one version search and ingest use for its base model
])
"""LoRA-weight encoder versions. Search uses a base model's active version only, and a version
becomes active only after every row of that base carries its embedding (one switch)."""
