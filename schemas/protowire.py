"""The protobuf wire format, read and written by hand for the one message both sides touch: a
sentencepiece `ModelProto` (the tokenizer model every manifest's fingerprint names).

sentencepiece's generated `sentencepiece_model_pb2` refuses to load under a protobuf runtime older
than its gencode (here 6.33 against 7.36), and the tokenizer jobs edit one field of a few pieces
(`dataprep.chat.template.controls_unreachable`) while the HF export reads a few settings
(`trainer.hf.sentencepiece_hf.read_spec`): neither needs the schema.
"""

from __future__ import annotations

from collections.abc import Iterator


def varint(buf: bytes, pos: int) -> tuple[int, int]:
    """(value, position after it) of the varint at `pos`."""
    value = shift = 0
    while True:
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, pos
        shift += 7


def varint_bytes(value: int) -> bytes:
    out = bytearray()
    while True:
        b = value & 0x7F
        value >>= 7
        out.append(b | 0x80 if value else b)
        if not value:
            return bytes(out)


def fields(buf: bytes, lo: int = 0, hi: int | None = None
           ) -> Iterator[tuple[int, int, int, int, tuple[int, int, int | None]]]:
    """(field, wire type, start, end, (payload start, payload end, varint value)) per field of
    the message in `buf[lo:hi]`."""
    pos, hi = lo, len(buf) if hi is None else hi
    while pos < hi:
        start = pos
        key, pos = varint(buf, pos)
        field, wire = key >> 3, key & 7
        value = None
        if wire == 0:
            value, pos = varint(buf, pos)
            p0 = p1 = pos
        elif wire == 1:
            p0, p1 = pos, pos + 8
        elif wire == 2:
            n, p0 = varint(buf, pos)
            p1 = p0 + n
        elif wire == 5:
            p0, p1 = pos, pos + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        if p1 > hi:
            raise ValueError(f"field {field} runs past the end of its message")
        pos = max(pos, p1)
        yield field, wire, start, pos, (p0, p1, value)


def message(buf: bytes) -> dict[int, list[int | bytes]]:
    """Each field's values in order: integers for varints, bytes for the others."""
    out: dict[int, list[int | bytes]] = {}
    for field, wire, _, _, (p0, p1, value) in fields(buf):
        out.setdefault(field, []).append(value if wire == 0 else buf[p0:p1])
    return out
