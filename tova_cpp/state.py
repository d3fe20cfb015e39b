"""A saved bounded conversation: llama.cpp's sequence state + the engine's bookkeeping, in one checked file.

File layout (version 1), all integers little-endian:

    b"TOVASESS"            8 bytes, magic
    version                uint32
    header length H        uint32
    header                 H bytes of UTF-8 JSON: model identity, settings, n_tokens, seed and the
                           (offset, length) of each section in the payload
    payload                sections: llama_state (llama_state_seq_get_data of the saved sequence: 0 for a
                           Session), engine_state (tova_engine_export_state, or tova_engine_seq_export_state
                           for one sequence of a BatchSession), scores (float32 logits of the last position),
                           input_ids (int32: the tokens a Llama, or a server's parked slot, has seen, in
                           order; empty for a Session)
    sha256                 32 bytes over everything before it

The model's identity is the sha256 of its file size (8 bytes) + its first 4 MiB + its last 4 MiB: the
first MiBs hold the GGUF header and metadata, the last ones tensor data, so another model, another
quantization or another fine-tune of the same architecture gives another identity without reading the
whole file (docs/STATE.md).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import StateError

MAGIC = b"TOVASESS"
VERSION = 1
_PREFIX = struct.Struct("<8sII")
_DIGEST = 32
_ID_SPAN = 4 << 20
SECTIONS = ("llama_state", "engine_state", "scores", "input_ids")
# llama_state_seq_get_data starts with this magic (llama-context.cpp, io_magic) and the sequence id
_SEQ_MAGIC = 0xAF143CD8


@dataclass
class TovaState:
    """What `save_state()` returns and `load_state()` takes: llama_cpp.LlamaState's fields (n_tokens,
    scores, llama_state, llama_state_size, seed) plus the engine's bookkeeping and the settings it is valid
    for. Deviation from LlamaState, named: no input_ids (the bounded cache does not keep the token history;
    a Llama keeps the tokens it has seen as `input_ids`, empty for a Session), and `scores` holds only the
    last position's logits (float32 [1, n_vocab]; [0, n_vocab] before any token)."""

    n_tokens: int  # tokens seen: the next token's position
    scores: np.ndarray
    llama_state: bytes
    engine_state: bytes
    model_id: str
    settings: dict
    seed: int | None = None
    input_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    extra: dict = field(default_factory=dict)

    @property
    def llama_state_size(self) -> int:
        return len(self.llama_state)


def model_identity(path: str | os.PathLike) -> str:
    """sha256 of the file size + the first and last 4 MiB of the GGUF (see the module docstring)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        h.update(size.to_bytes(8, "little"))
        h.update(f.read(_ID_SPAN))
        f.seek(max(size - _ID_SPAN, 0))
        h.update(f.read(_ID_SPAN))
    return "sha256:" + h.hexdigest()


def encode(state: TovaState) -> bytes:
    parts = {
        "llama_state": state.llama_state,
        "engine_state": state.engine_state,
        "scores": np.ascontiguousarray(state.scores, dtype="<f4").tobytes(),
        "input_ids": np.ascontiguousarray(state.input_ids, dtype="<i4").tobytes(),
    }
    offsets, payload, at = {}, [], 0
    for name in SECTIONS:
        offsets[name] = [at, len(parts[name])]
        payload.append(parts[name])
        at += len(parts[name])
    header = {
        "format": "tova_cpp session state",
        "model": state.model_id,
        "settings": state.settings,
        "n_tokens": state.n_tokens,
        "seed": state.seed,
        "scores_shape": list(np.shape(state.scores)),
        "sections": offsets,
        **({"extra": state.extra} if state.extra else {}),
    }
    head = json.dumps(header, sort_keys=True).encode()
    body = _PREFIX.pack(MAGIC, VERSION, len(head)) + head + b"".join(payload)
    return body + hashlib.sha256(body).digest()


def decode(data: bytes, source: str = "state") -> TovaState:
    """Parse and verify a state file's bytes; StateError when truncated, corrupted or of another version."""
    if len(data) < _PREFIX.size + _DIGEST:
        raise StateError(f"{source} is truncated ({len(data)} bytes): not a tova_cpp session file")
    magic, version, n_head = _PREFIX.unpack_from(data)
    if magic != MAGIC:
        raise StateError(f"{source} is not a tova_cpp session file (magic {magic!r})")
    if version != VERSION:
        raise StateError(f"{source} has format version {version}; this tova_cpp reads version {VERSION}")
    body, digest = data[:-_DIGEST], data[-_DIGEST:]
    if hashlib.sha256(body).digest() != digest:
        raise StateError(f"{source} is truncated or corrupted (checksum mismatch)")
    start = _PREFIX.size + n_head
    try:
        header = json.loads(body[_PREFIX.size : start].decode())
        sections = {}
        for name in SECTIONS:
            off, n = header["sections"][name]
            if off < 0 or n < 0 or start + off + n > len(body):
                raise ValueError(f"section {name} out of bounds")
            sections[name] = bytes(body[start + off : start + off + n])
        scores = np.frombuffer(sections["scores"], dtype="<f4").reshape(header["scores_shape"]).copy()
        return TovaState(
            n_tokens=int(header["n_tokens"]),
            scores=scores,
            llama_state=sections["llama_state"],
            engine_state=sections["engine_state"],
            model_id=str(header["model"]),
            settings=dict(header["settings"]),
            seed=header["seed"],
            input_ids=np.frombuffer(sections["input_ids"], dtype="<i4").astype(np.int32),
            extra=dict(header.get("extra", {})),
        )
    except (ValueError, KeyError, TypeError) as e:
        raise StateError(f"{source} has a malformed header: {e}") from None


def write_file(path: str | os.PathLike, state: TovaState) -> int:
    """Write atomically (a temporary file renamed over `path`): a crash never leaves half a file."""
    data = encode(state)
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return len(data)


def read_file(path: str | os.PathLike) -> TovaState:
    with open(path, "rb") as f:
        return decode(f.read(), source=str(path))


# -- the engine's export (csrc/engine.cpp, tova_engine_export_state) ----------------------------------------
@dataclass
class EngineCells:
    settings: tuple[int, ...]  # policy, n_layer, budget, keep, n_sink, evict_interval
    cells: np.ndarray  # int32 [n_occ] cell indices, ascending
    meta: np.ndarray  # int32 [n_occ] metadata position of each cell
    layer_pos: np.ndarray  # int32 [n_layer, n_occ]
    acc: np.ndarray  # float64 [n_layer, n_occ]


def parse_engine_state(data: bytes) -> EngineCells:
    if len(data) < 36:
        raise StateError("engine state is truncated")
    h = np.frombuffer(data, dtype="<i4", count=9)
    n_layer, n_occ = int(h[3]), int(h[8])
    if n_layer < 1 or n_occ < 0 or len(data) != 4 * (9 + 2 * n_occ + n_layer * n_occ) + 8 * n_layer * n_occ:
        raise StateError("engine state has the wrong size")
    pairs = np.frombuffer(data, dtype="<i4", count=2 * n_occ, offset=36).reshape(n_occ, 2)
    off = 36 + 8 * n_occ
    lpos = np.frombuffer(data, dtype="<i4", count=n_layer * n_occ, offset=off).reshape(n_layer, n_occ)
    acc = np.frombuffer(data, dtype="<f8", count=n_layer * n_occ, offset=off + 4 * n_layer * n_occ)
    return EngineCells(
        tuple(int(x) for x in h[2:8]), pairs[:, 0], pairs[:, 1], lpos, acc.reshape(n_layer, n_occ)
    )


# -- llama.cpp's sequence state (llama_state_seq_get_data of a llama-like KV cache) ---------------------------
@dataclass
class SeqBlob:
    positions: (
        np.ndarray
    )  # int32 [n]: metadata position of each saved cell, in the saving context's cell order
    v_trans: int
    k: list  # per layer (k_type, row bytes, uint8 [n, row])
    v: list  # per layer (v_type, row or element bytes, n_embd_v or 0, uint8 [n, row] or [n_embd_v, n, el])


def parse_seq_blob(blob: bytes) -> SeqBlob:
    """Read the layout llama.cpp writes (llama-kv-cache.cpp, state_write_meta/state_write_data, single stream,
    no per-cell extension). StateError when the bytes do not follow it exactly."""
    try:
        return _parse_seq_blob(memoryview(blob))
    except (struct.error, ValueError) as e:
        raise StateError(f"llama.cpp sequence state has an unexpected layout: {e}") from None


def _parse_seq_blob(b: memoryview) -> SeqBlob:
    magic, _seq, n_stream = struct.unpack_from("<IiI", b, 0)
    if magic != _SEQ_MAGIC or n_stream != 1:
        raise ValueError(f"magic {magic:#x}, {n_stream} streams")
    (n,) = struct.unpack_from("<I", b, 12)
    at = 16
    if n == 0:
        if at != len(b):
            raise ValueError("trailing bytes after an empty stream")
        return SeqBlob(np.zeros(0, np.int32), 0, [], [])
    meta = np.frombuffer(b, dtype="<i4", count=3 * n, offset=at).reshape(n, 3)
    if (meta[:, 1] != 1).any() or (meta[:, 2] != _seq).any():
        raise ValueError(f"cells are not of sequence {_seq} alone (or carry an extension)")
    at += 12 * n
    v_trans, n_layer = struct.unpack_from("<II", b, at)
    at += 8
    k, v = [], []
    for _ in range(n_layer):
        t, row = struct.unpack_from("<iQ", b, at)
        at += 12
        k.append((t, row, np.frombuffer(b, np.uint8, n * row, at).reshape(n, row)))
        at += n * row
    for _ in range(n_layer):
        if v_trans:
            t, el, n_embd = struct.unpack_from("<iII", b, at)
            at += 12
            v.append((t, el, n_embd, np.frombuffer(b, np.uint8, n_embd * n * el, at).reshape(n_embd, n, el)))
            at += n_embd * n * el
        else:
            t, row = struct.unpack_from("<iQ", b, at)
            at += 12
            v.append((t, row, 0, np.frombuffer(b, np.uint8, n * row, at).reshape(n, row)))
            at += n * row
    if at != len(b):
        raise ValueError(f"{len(b) - at} bytes left over")
    return SeqBlob(meta[:, 0].copy(), v_trans, k, v)


def place_cells(blob: bytes, seq: SeqBlob, cells: np.ndarray) -> tuple[bytes, int]:
    """The blob rewritten so that llama.cpp, loading it into an empty cache, puts saved cell i into cell
    cells[i]: a loading cache fills its lowest free cells in blob order, so every gap below the highest cell
    gets a filler cell (zero rows, positions after the window) that the caller removes with seq_rm.
    Returns (blob, first filler position); the original blob when there are no gaps."""
    n = seq.positions.size
    top = int(cells[-1]) + 1 if n else 0
    layout = np.full(top, -1, dtype=np.int64)
    layout[cells] = np.arange(n)
    return place_layout(blob, seq, layout)


def place_layout(blob: bytes, seq: SeqBlob, layout: np.ndarray) -> tuple[bytes, int]:
    """The blob rewritten for llama.cpp's slot search: the i-th cell its load fills receives saved cell
    layout[i], or a filler cell (zero rows, positions after the window, for the caller to remove with seq_rm)
    where layout[i] < 0. Returns (blob, first filler position); the original blob when there are no fillers
    and the saved order is kept."""
    n, m = seq.positions.size, len(layout)
    take = np.asarray(layout, dtype=np.int64)
    fill = take < 0
    if m == n and np.array_equal(take, np.arange(n)):
        return blob, -1
    first_filler = int(seq.positions.max()) + 1
    pos = np.empty(m, dtype=np.int32)
    pos[~fill] = seq.positions[take[~fill]]
    pos[fill] = first_filler + np.arange(int(fill.sum()), dtype=np.int32)
    src = np.where(fill, 0, take)
    out = [struct.pack("<IiII", _SEQ_MAGIC, 0, 1, m)]
    meta = np.zeros((m, 3), dtype="<i4")
    meta[:, 0], meta[:, 1] = pos, 1
    out += [meta.tobytes(), struct.pack("<II", seq.v_trans, len(seq.k))]
    for t, row, rows in seq.k:
        full = rows[src]
        full[fill] = 0
        out += [struct.pack("<iQ", t, row), full.tobytes()]
    for t, size, n_embd, rows in seq.v:
        if seq.v_trans:
            full = rows[:, src]
            full[:, fill] = 0
            out += [struct.pack("<iII", t, size, n_embd), full.tobytes()]
        else:
            full = rows[src]
            full[fill] = 0
            out += [struct.pack("<iQ", t, size), full.tobytes()]
    return b"".join(out), (first_filler if fill.any() else -1)


def check_fits(state, model_id: str, settings: dict, n_vocab: int) -> tuple[SeqBlob, EngineCells]:
    """StateError unless `state` (a TovaState) was saved with this model and these settings and its parts agree
    (llama.cpp's cells, the engine's bookkeeping, the token count, the logits' shape). Returns the parsed parts."""
    if not isinstance(state, TovaState):
        raise TypeError(f"load_state takes a TovaState, got {type(state).__name__}")
    if state.model_id != model_id:
        raise StateError(
            f"the state was saved with another model ({state.model_id[:19]}...), this one is {model_id[:19]}..."
        )
    diff = {k: (state.settings.get(k), v) for k, v in settings.items() if state.settings.get(k) != v}
    if diff:
        said = ", ".join(f"{k}={a!r} (here: {b!r})" for k, (a, b) in sorted(diff.items()))
        raise StateError(f"the state was saved with other settings: {said}")
    seq = parse_seq_blob(state.llama_state)
    cells = parse_engine_state(state.engine_state)
    n = cells.meta.size
    if (
        not np.array_equal(seq.positions, cells.meta)
        or (n == 0) != (state.n_tokens == 0)
        or (n and cells.meta.max() != state.n_tokens - 1)
    ):
        raise StateError("the state's llama.cpp cells, engine bookkeeping and token count disagree")
    if state.scores.shape not in ((0, n_vocab), (1, n_vocab)) or (
        state.n_tokens == 0 and state.scores.shape[0]
    ):
        raise StateError(f"the state's scores have shape {state.scores.shape}")
    return seq, cells
