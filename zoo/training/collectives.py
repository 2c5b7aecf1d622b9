"""What a compiled multi-slice step sends between slices, read from its HLO text.

libtpu compiles a collective whose devices span slices into transfers over the data-center
network (DCN): send/recv pairs handled by the megascale runtime, tagged with the collective's
kind (`_xla_megascale_transfer_type`: ALL_REDUCE, ALL_GATHER, REDUCE_SCATTER, ALL_TO_ALL, ...).
Collectives within a slice stay ordinary all-reduce / all-gather / ... ops over its ICI.
"""

from __future__ import annotations

import math
import re

_SEND = re.compile(r"=\s*(?P<type>.*?)\ssend\(.*_xla_megascale_transfer_type=\"(?P<kind>\w+)\"")
_ARRAY = re.compile(r"\b(pred|bf16|f8e\w+|[suf]\d+)\[([\d,]*)\]")
_BITS = {"pred": 8, "bf16": 16}


def payload_bytes(type_text: str) -> int:
    """Bytes of the data a send carries: the first array of its HLO type ("(f32[4,8]{1,0}, u32[],
    token[])" -> 128; the u32 context and the token are not data)."""
    m = _ARRAY.search(type_text)
    if not m:
        return 0
    t, dims = m.groups()
    bits = _BITS.get(t) or (8 if t.startswith("f8") else int(t[1:]))
    return math.prod(int(d) for d in dims.split(",") if d) * bits // 8


def dcn_transfers(hlo_text: str) -> dict[str, dict[str, int]]:
    """Per collective kind, one device's DCN sends in the program text: {"ALL_REDUCE": {"count",
    "bytes"}}, each op once (an op in a loop body, as a scanned layer's, runs once per iteration but
    counts once); empty for a single-slice program."""
    out: dict[str, dict[str, int]] = {}
    for line in hlo_text.splitlines():
        m = _SEND.search(line)
        if m:
            entry = out.setdefault(m.group("kind"), {"count": 0, "bytes": 0})
            entry["count"] += 1
            entry["bytes"] += payload_bytes(m.group("type"))
    return out
