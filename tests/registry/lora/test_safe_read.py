"""Tests for registry.lora.safe_read: strict safetensors reading, never unpickling."""

from __future__ import annotations

import pickle
import struct
import time

import pytest
import torch

from bad_files import (
    TENSOR_DTYPES,
    entry,
    write_good_safetensors,
    write_malicious_pickle,
    write_malicious_torch_save,
    write_raw_safetensors,
)
from registry.lora import safe_read
from registry.lora.errors import RejectedFile
from registry.lora.safe_read import read_header, read_safetensors, sniff_kind


def rejected(path, **kw) -> RejectedFile:
    with pytest.raises(RejectedFile) as exc:
        read_safetensors(path, **kw)
    assert exc.value.reason and exc.value.code in str(exc.value)
    return exc.value


def f32(*values: float) -> bytes:
    return struct.pack(f"<{len(values)}f", *values)


# --- good files --------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", sorted(TENSOR_DTYPES))
def test_good_file_round_trips(tmp_path, dtype):
    tensors = {"a.lora_A.weight": torch.randn(4, 8).to(TENSOR_DTYPES[dtype]),
               "a.lora_B.weight": torch.randn(8, 4).to(TENSOR_DTYPES[dtype]),
               "scalar": torch.tensor(0.5, dtype=TENSOR_DTYPES[dtype]),
               "empty": torch.zeros(0, 3, dtype=TENSOR_DTYPES[dtype])}
    meta = {"ss_network_dim": "4", "base_model": "sd15"}
    path = write_good_safetensors(tmp_path / "ok.safetensors", tensors, meta)
    got, got_meta = read_safetensors(path)
    assert got_meta == meta
    assert got.keys() == tensors.keys()
    for k, t in tensors.items():
        assert got[k].dtype == t.dtype and got[k].shape == t.shape
        assert torch.equal(got[k], t)
    entries, meta2, start = read_header(path)
    assert meta2 == meta and set(entries) == set(tensors)
    assert start == 8 + struct.unpack("<Q", path.read_bytes()[:8])[0]
    assert sniff_kind(path) == "safetensors"


def test_no_metadata_gives_empty_dict(tmp_path):
    path = write_good_safetensors(tmp_path / "ok.safetensors")
    assert read_safetensors(path)[1] == {}


def test_header_length_with_0x80_low_byte_is_not_mistaken_for_pickle(tmp_path):
    path = write_raw_safetensors(tmp_path / "x.safetensors", {"w": entry("F32", [2])},
                                 f32(1, 2), pad_to=0x180)
    assert path.read_bytes()[0] == 0x80
    tensors, _ = read_safetensors(path)
    assert tensors["w"].tolist() == [1.0, 2.0]


def test_unaligned_data_section_loads_and_is_checked(tmp_path):
    header = {"h": entry("F16", [1], 0, 2), "w": entry("F32", [2], 2, 10)}
    data = struct.pack("<e", 1.5) + f32(1, 2)
    path = write_raw_safetensors(tmp_path / "x.safetensors", header, data, pad_to=129)
    tensors, _ = read_safetensors(path)  # data starts at byte 137: odd, and w at 139
    assert tensors["h"].tolist() == [1.5] and tensors["w"].tolist() == [1.0, 2.0]
    bad = write_raw_safetensors(tmp_path / "y.safetensors", header,
                                struct.pack("<e", 1.5) + f32(1, float("inf")), pad_to=129)
    err = rejected(bad)
    assert err.code == "nan_inf" and "'w'" in err.reason and "1 Inf" in err.reason


def test_tensors_are_private_copies_on_write(tmp_path):
    path = write_good_safetensors(tmp_path / "ok.safetensors", {"w": torch.ones(4)})
    before = path.read_bytes()
    tensors, _ = read_safetensors(path)
    tensors["w"].add_(1.0)
    assert path.read_bytes() == before and read_safetensors(path)[0]["w"].tolist() == [1.0] * 4


def test_nan_in_a_later_run_of_another_dtype_is_named(tmp_path):
    t = torch.ones(1000, dtype=torch.bfloat16)
    t[999] = float("nan")
    tensors = {"a": torch.ones(10), "b": torch.ones(10, dtype=torch.float16), "c": t,
               "d": torch.ones(3, dtype=torch.bfloat16)}
    err = rejected(write_good_safetensors(tmp_path / "n.safetensors", tensors))
    assert err.code == "nan_inf" and "'c'" in err.reason and "1 NaN" in err.reason


def test_check_finite_false_allows_nan(tmp_path):
    path = write_raw_safetensors(tmp_path / "x.safetensors", {"w": entry("F32", [2])},
                                 f32(float("nan"), 1))
    assert torch.isnan(read_safetensors(path, check_finite=False)[0]["w"][0])


# --- pickles are never unpickled -----------------------------------------------------------

def test_bombs_are_armed(tmp_path):
    """Sanity: the crafted files really would create the sentinel if unpickled."""
    s1, s2 = tmp_path / "armed1", tmp_path / "armed2"
    pickle.loads(write_malicious_pickle(tmp_path / "p", s1).read_bytes()).close()
    loaded = torch.load(write_malicious_torch_save(tmp_path / "t", s2), weights_only=False)
    loaded["payload"].close()
    assert s1.exists() and s2.exists()


@pytest.mark.parametrize("writer, kind", [(write_malicious_pickle, "pickle"),
                                          (write_malicious_torch_save, "zip")])
@pytest.mark.parametrize("suffix, code", [(".ckpt", "unsupported_extension"),
                                          (".pt", "unsupported_extension"),
                                          (".pth", "unsupported_extension"),
                                          (".bin", "unsupported_extension"),
                                          (".pkl", "unsupported_extension"),
                                          (".safetensors", "pickle")])
def test_malicious_pickles_rejected_without_unpickling(tmp_path, writer, kind, suffix, code):
    sentinel = tmp_path / "PWNED"
    path = writer(tmp_path / f"lora{suffix}", sentinel)
    assert sniff_kind(path) == kind
    for fn in (read_safetensors, read_header):
        with pytest.raises(RejectedFile) as exc:
            fn(path)
        assert exc.value.code == code
        assert "not loaded" in exc.value.reason or "refusing to unpickle" in exc.value.reason
    assert not sentinel.exists()


def test_good_safetensors_under_wrong_extension_rejected(tmp_path):
    path = write_good_safetensors(tmp_path / "lora.bin")
    err = rejected(path)
    assert err.code == "unsupported_extension" and "wrong extension" in err.reason


def test_missing_file(tmp_path):
    assert rejected(tmp_path / "nope.safetensors").code == "not_a_file"


# --- malformed files -----------------------------------------------------------------------

def test_empty_file(tmp_path):
    (tmp_path / "e.safetensors").write_bytes(b"")
    assert sniff_kind(tmp_path / "e.safetensors") == "empty"
    assert rejected(tmp_path / "e.safetensors").code == "empty"


def test_shorter_than_length_prefix(tmp_path):
    (tmp_path / "t.safetensors").write_bytes(b"\x10\x00\x00")
    assert rejected(tmp_path / "t.safetensors").code == "truncated"


def test_truncated_data_section(tmp_path):
    path = write_good_safetensors(tmp_path / "t.safetensors")
    path.write_bytes(path.read_bytes()[:-10])
    err = rejected(path)
    assert err.code == "truncated" and "truncated" in err.reason


def test_header_length_past_eof(tmp_path):
    path = write_raw_safetensors(tmp_path / "h.safetensors", {}, length=10_000)
    err = rejected(path)
    assert err.code == "header_past_eof" and "10000" in err.reason


def test_huge_header_length_rejected_before_reading(tmp_path):
    path = write_raw_safetensors(tmp_path / "h.safetensors", {}, length=2**63)
    assert rejected(path).code == "header_too_large"


def test_header_over_cap(tmp_path, monkeypatch):
    monkeypatch.setattr(safe_read, "MAX_HEADER_BYTES", 64)
    path = write_raw_safetensors(tmp_path / "h.safetensors", {"w": entry("F32", [1])},
                                 f32(1), pad_to=65)
    assert rejected(path).code == "header_too_large"


@pytest.mark.parametrize("raw", [b"{not json", b"\xff\xfe{}", b"[1, 2]", b'"x"',
                                 b'{"a": 1, "a": 2}', b"[" * 100_000])
def test_invalid_json(tmp_path, raw):
    path = write_raw_safetensors(tmp_path / "j.safetensors", None, raw_header=raw)
    assert rejected(path).code == "invalid_json"


@pytest.mark.parametrize("meta", [["a"], {"k": 1}, {"k": None}, "str"])
def test_invalid_metadata(tmp_path, meta):
    path = write_raw_safetensors(tmp_path / "m.safetensors",
                                 {"__metadata__": meta, "w": entry("F32", [1])}, f32(1))
    assert rejected(path).code == "invalid_metadata"


def test_too_many_tensors(tmp_path, monkeypatch):
    monkeypatch.setattr(safe_read, "MAX_TENSORS", 3)
    header = {f"t{i}": entry("F32", [1], 4 * i) for i in range(4)}
    path = write_raw_safetensors(tmp_path / "n.safetensors", header, f32(0, 1, 2, 3))
    assert rejected(path).code == "too_many_tensors"


@pytest.mark.parametrize("dtype", ["I64", "I32", "U8", "BOOL", "F8_E4M3", "Q4_K"])
def test_bad_dtype(tmp_path, dtype):
    path = write_raw_safetensors(tmp_path / "d.safetensors",
                                 {"w": entry(dtype, [1], 0, 8)}, b"\0" * 8)
    err = rejected(path)
    assert err.code == "bad_dtype" and dtype in err.reason


@pytest.mark.parametrize("shape", [[-1, 2], "4", [2.0], [True], None])
def test_bad_shape(tmp_path, shape):
    path = write_raw_safetensors(tmp_path / "s.safetensors",
                                 {"w": {"dtype": "F32", "shape": shape, "data_offsets": [0, 8]}},
                                 f32(1, 2))
    assert rejected(path).code == "bad_shape"


@pytest.mark.parametrize("offsets", [[0], [0, "8"], [8, 0], [-8, 0], [0, 12], None, [0.0, 8]])
def test_malformed_offsets(tmp_path, offsets):
    path = write_raw_safetensors(tmp_path / "o.safetensors",
                                 {"w": {"dtype": "F32", "shape": [2], "data_offsets": offsets}},
                                 f32(1, 2))
    assert rejected(path).code == "bad_offsets"


def test_overlapping_offsets(tmp_path):
    header = {"a": entry("F32", [2], 0), "b": entry("F32", [2], 4)}
    path = write_raw_safetensors(tmp_path / "o.safetensors", header, f32(1, 2, 3))
    err = rejected(path)
    assert err.code == "bad_offsets" and "overlaps" in err.reason


def test_out_of_range_offsets(tmp_path):
    header = {"a": entry("F32", [2], 0), "b": entry("F32", [2], 1024)}
    path = write_raw_safetensors(tmp_path / "o.safetensors", header, f32(1, 2, 3, 4))
    err = rejected(path)
    assert err.code == "bad_offsets" and "outside" in err.reason


def test_hole_between_tensors(tmp_path):
    header = {"a": entry("F32", [1], 0), "b": entry("F32", [1], 8)}
    path = write_raw_safetensors(tmp_path / "o.safetensors", header, f32(1, 2, 3))
    err = rejected(path)
    assert err.code == "bad_offsets" and "hole" in err.reason


def test_trailing_bytes(tmp_path):
    path = write_raw_safetensors(tmp_path / "o.safetensors", {"a": entry("F32", [1])}, f32(1, 2))
    assert rejected(path).code == "bad_offsets"


def test_bad_entry(tmp_path):
    path = write_raw_safetensors(tmp_path / "o.safetensors", {"a": [1, 2]}, f32(1))
    assert rejected(path).code == "bad_entry"


@pytest.mark.parametrize("bad, word", [(float("nan"), "1 NaN"), (float("inf"), "1 Inf"),
                                       (float("-inf"), "1 Inf")])
@pytest.mark.parametrize("dtype", sorted(TENSOR_DTYPES))
@pytest.mark.parametrize("numel, at", [(4, 2), (100_003, 77_777)])  # scalar and vector paths
def test_nan_inf_weights(tmp_path, bad, word, dtype, numel, at):
    t = torch.rand(numel, dtype=TENSOR_DTYPES[dtype])
    t[at] = bad
    path = write_good_safetensors(tmp_path / "n.safetensors", {"ok": torch.ones(2), "w": t})
    err = rejected(path)
    assert err.code == "nan_inf" and "'w'" in err.reason and word in err.reason


# --- performance ---------------------------------------------------------------------------

def test_100mb_file_loads_quickly(tmp_path):
    tensors = {f"layer{i}.lora_A.weight": torch.randn(1024, 1024) for i in range(25)}  # 100 MiB
    path = write_good_safetensors(tmp_path / "big.safetensors", tensors)
    t0 = time.perf_counter()
    got, _ = read_safetensors(path)
    elapsed = time.perf_counter() - t0
    assert torch.equal(got["layer7.lora_A.weight"], tensors["layer7.lora_A.weight"])
    assert elapsed < 2.0, f"loading 100 MiB took {elapsed:.2f}s"
