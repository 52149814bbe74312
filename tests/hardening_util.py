"""Shared by the tests/test_hardening*.py suites: the one assertion every bad input must pass.

`attempt` runs a CLI's `main(argv)` in-process and checks the contract of issue 9: either success
(when the mutation happened to be harmless) or exactly one `error: ...` line with exit 1 (2 for
flags), no output dir, no temp dir beside it, and inputs byte-identical.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
from pathlib import Path

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

# Fixed, derandomized example counts: the suite is the same cases on every run.
SETTINGS = dict(
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
COUNTS: dict[str, int] = {}  # category -> cases run (printed by the suites' last test)


def cases(n: int):
    return settings(max_examples=n, **SETTINGS)


def count(category: str) -> None:
    COUNTS[category] = COUNTS.get(category, 0) + 1


def tree_hash(root: Path) -> str:
    """Names, modes and bytes of every file under `root` (links followed): inputs must not change."""
    root = Path(root)
    h = hashlib.sha256()
    if root.is_file():
        return hashlib.sha256(root.read_bytes()).hexdigest()
    for p in sorted(root.rglob("*")):
        h.update(str(p.relative_to(root)).encode())
        if p.is_file():
            h.update(oct(p.stat().st_mode).encode() + p.read_bytes())
    return h.hexdigest()


def leftovers(out: Path) -> list[str]:
    """Temp dirs of `out` left in its parent."""
    if not out.parent.is_dir():
        return []
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith((f".{out.name}.tmp-", f".{out.name}.new-")))


def attempt(capsys, main, argv, *, inputs=(), outs=(), codes=(1, 2), ok=False, category=None) -> tuple[int, str]:
    """Run `main(argv)`; assert the bad-input contract. `ok`: success is acceptable too."""
    if category:
        count(category)
    before = {Path(p): tree_hash(p) for p in inputs if p is not None}
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    err = re.sub(r"^.*\r", "", err, flags=re.MULTILINE)  # a progress bar a terminal overwrites (it ends in \r)
    for p, h in before.items():
        assert tree_hash(p) == h, f"input {p} changed"
    for o in outs:
        assert leftovers(Path(o)) == [], leftovers(Path(o))
    if code == 0 and ok:
        return code, err
    assert code in codes, (code, err)
    lines = [x for x in err.splitlines() if not x.startswith("warning: ")]  # one-line warnings may precede it
    assert len(lines) == 1 and lines[0].startswith("error: ") and err.endswith("\n") and "Traceback" not in err, err
    err = lines[0] + "\n"
    for o in outs:
        assert not Path(o).exists(), f"{o} was written"
    return code, err


# ----------------------------------------------------------------------------- file surgery
JSON_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.sampled_from([0, -1, 1, 2.5, 1e20, float("nan"), float("inf"), "", "7", "x" * 300]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=4),
    st.lists(st.integers(-3, 300), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)


def split_safetensors(blob: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8 : 8 + n]), blob[8 + n :]


def join_safetensors(header, data: bytes, length: int | None = None) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text) if length is None else length) + text + data


def boundaries(blob: bytes) -> list[int]:
    """Every structural boundary of a safetensors file: inside the length field, the header's
    start, each JSON token boundary of the header, each tensor's first and last byte, the end."""
    header, _ = split_safetensors(blob)
    (n,) = struct.unpack("<Q", blob[:8])
    cuts = {0, 1, 4, 7, 8, 9, 8 + n - 1, 8 + n, 8 + n + 1, len(blob) - 1}
    text = blob[8 : 8 + n]
    cuts |= {8 + i + 1 for i, c in enumerate(text) if c in b"{}[]:,"}
    for e in header.values():
        if isinstance(e, dict) and "data_offsets" in e:
            a, b = e["data_offsets"]
            cuts |= {8 + n + a + 1, 8 + n + b - 1}
    return sorted(c for c in cuts if 0 <= c < len(blob))
