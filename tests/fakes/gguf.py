"""A copy of the embedded GGUF that names fill-in-the-middle markers (SmolLM2 has none), so that
the `suffix` path of the local engine runs in tests."""

from __future__ import annotations

import struct
from pathlib import Path

FIM_MARKERS = (3, 5, 6)  # three control tokens the copy names as its prefix, suffix and middle

_GGUF_FIXED_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_GGUF_UINT32, _GGUF_STRING, _GGUF_ARRAY = 4, 8, 9


def with_fim_markers(source: Path, target: Path, markers: tuple[int, int, int]) -> None:
    """Copy a GGUF (version 3), adding the metadata keys that name its FIM prefix, suffix and middle
    tokens: the header grows, the tensor data moves as a block to the next aligned offset."""
    data = source.read_bytes()
    magic, version, n_tensors, n_kv = struct.unpack_from("<4sIQQ", data)
    assert (magic, version) == (b"GGUF", 3)

    def string(at: int) -> tuple[bytes, int]:
        (n,) = struct.unpack_from("<Q", data, at)
        return data[at + 8 : at + 8 + n], at + 8 + n

    def skip_value(at: int, kind: int) -> int:
        if kind == _GGUF_STRING:
            return string(at)[1]
        if kind != _GGUF_ARRAY:
            return at + _GGUF_FIXED_SIZES[kind]
        item, count = struct.unpack_from("<IQ", data, at)
        at += 12
        if item != _GGUF_STRING:
            return at + _GGUF_FIXED_SIZES[item] * int(count)
        for _ in range(count):
            at = string(at)[1]
        return at

    at, alignment = 24, 32
    for _ in range(n_kv):
        key, at = string(at)
        (kind,) = struct.unpack_from("<I", data, at)
        if key == b"general.alignment":
            (alignment,) = struct.unpack_from("<I", data, at + 4)
        at = skip_value(at + 4, kind)
    kv_end = at
    for _ in range(n_tensors):
        (n_dims,) = struct.unpack_from("<I", data, string(at)[1])
        at = string(at)[1] + 4 + 8 * n_dims + 4 + 8
    tensors_at = -(-at // alignment) * alignment
    added = b"".join(
        struct.pack("<Q", len(key)) + key + struct.pack("<II", _GGUF_UINT32, token)
        for key, token in zip(
            (
                b"tokenizer.ggml.fim_pre_token_id",
                b"tokenizer.ggml.fim_suf_token_id",
                b"tokenizer.ggml.fim_mid_token_id",
            ),
            markers,
            strict=True,
        )
    )
    head = struct.pack("<4sIQQ", magic, version, n_tensors, n_kv + 3) + data[24:kv_end] + added
    head += data[kv_end:at]
    target.write_bytes(head + b"\0" * (-len(head) % alignment) + data[tensors_at:])
