from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from animl_lightning.core.files import (
    UnsafePathError,
    atomic_write,
    atomic_write_json,
    atomic_write_text,
    remove_stale_temporaries,
    safe_join,
    safe_relative,
)


def test_atomic_write_replaces_whole_file(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "out.txt"
    atomic_write_text(target, "first")
    atomic_write_text(target, "second")
    assert target.read_text() == "second"
    assert [p.name for p in target.parent.iterdir()] == ["out.txt"]


def test_atomic_write_failure_leaves_old_content_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "out.json"
    atomic_write_json(target, {"a": 1})
    with pytest.raises(RuntimeError), atomic_write(target, "w") as handle:
        handle.write('{"half": ')
        raise RuntimeError("killed mid-write")
    assert json.loads(target.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_atomic_write_json_refuses_nan(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        atomic_write_json(tmp_path / "x.json", {"v": float("nan")})
    assert not (tmp_path / "x.json").exists()


def test_remove_stale_temporaries(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    stale = tmp_path / "a" / ".crop.jpg.tmp-abc123"
    stale.write_bytes(b"partial")
    keep = tmp_path / "a" / "crop.jpg"
    keep.write_bytes(b"whole")
    assert remove_stale_temporaries(tmp_path) == 1
    assert not stale.exists()
    assert keep.exists()


@pytest.mark.parametrize(
    "bad",
    ["", "/etc/passwd", "../x.jpg", "a/../../x.jpg", "a//b.jpg", "./a.jpg", "a\\..\\b.jpg", "C:/x.jpg", "a\x00b"],
)
def test_safe_relative_refuses_escapes(bad: str) -> None:
    with pytest.raises(UnsafePathError):
        safe_relative(bad)


def test_safe_join_keeps_unicode_and_spaces(tmp_path: Path) -> None:
    joined = safe_join(tmp_path, "proj/cam 1/Zorro gris ñ.jpg")
    assert joined == tmp_path / "proj" / "cam 1" / "Zorro gris ñ.jpg"


@given(st.lists(st.sampled_from(["a", "b", "..", ".", "", "ü x", "c.jpg"]), min_size=1, max_size=6))
def test_safe_join_never_leaves_root(parts: list[str]) -> None:
    name = "/".join(parts)
    root = Path("/data/root")
    try:
        joined = safe_join(root, name)
    except UnsafePathError:
        return
    assert joined.resolve().is_relative_to(root.resolve()) if joined.is_absolute() else True
    assert ".." not in joined.parts
