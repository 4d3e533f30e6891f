"""Property tests: damaged shards and manifests of every kind are reported, never crash validate.

Within a dataset directory every damaged shard is caught (the manifest's sha256 covers it); a
single file checked alone is caught when truncated or replaced by garbage, and survives bit flips
without a traceback (an Arrow IPC file carries no checksum, so a flipped token id can be valid).
"""

from __future__ import annotations

import os
import shutil
import tempfile

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from schemas.validate import validate_path
from tests.schemas.conftest import CONTRACT_NAMES, make_dataset

_PRISTINE: dict[str, str] = {}


def pristine(name: str) -> str:
    if name not in _PRISTINE:
        _PRISTINE[name] = make_dataset(tempfile.mkdtemp(prefix=f"pristine-{name}-"), name,
                                       shards=1, rows=6)
    return _PRISTINE[name]


def copy_of(name: str) -> str:
    dst = tempfile.mkdtemp(prefix=f"fuzz-{name}-")
    shutil.copytree(pristine(name), dst, dirs_exist_ok=True)
    return dst


def shard_files(directory: str) -> list[str]:
    return sorted(os.path.join(directory, f) for f in os.listdir(directory)
                  if f.startswith("shard-"))


Mutation = tuple[str, float, int, bytes]
mutations = st.tuples(
    st.sampled_from(["truncate", "flip", "garbage"]),
    st.floats(min_value=0.0, max_value=0.999),
    st.integers(min_value=0, max_value=7),
    st.binary(min_size=1, max_size=64),
)


def mutate(path: str, mutation: Mutation) -> bool:
    """Apply the mutation; False when it left the bytes unchanged."""
    kind, where, bit, garbage = mutation
    data = open(path, "rb").read()
    pos = int(where * len(data))
    if kind == "truncate":
        new = data[:pos]
    elif kind == "flip":
        new = bytearray(data)
        new[pos] ^= 1 << bit
        new = bytes(new)
    else:
        new = garbage
    with open(path, "wb") as f:
        f.write(new)
    return new != data


def assert_one_line_issues(report) -> None:
    for issue in report.issues:
        text = str(issue)
        assert "\n" not in text and "Traceback" not in text and text


FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck),
                derandomize=True)


@FUZZ
@given(name=st.sampled_from(CONTRACT_NAMES), which=st.integers(0, 10), mutation=mutations)
def test_damaged_shard_in_dataset_is_invalid(name, which, mutation):
    directory = copy_of(name)
    try:
        files = shard_files(directory)
        if not mutate(files[which % len(files)], mutation):
            return
        report = validate_path(directory)
        assert not report.ok
        assert_one_line_issues(report)
    finally:
        shutil.rmtree(directory)


@settings(FUZZ, max_examples=200)
@given(name=st.sampled_from(CONTRACT_NAMES), which=st.integers(0, 10), mutation=mutations)
def test_damaged_single_file_never_crashes_and_truncation_or_garbage_is_invalid(
        name, which, mutation):
    directory = copy_of(name)
    try:
        files = shard_files(directory)
        target = files[which % len(files)]
        if not mutate(target, mutation):
            return
        report = validate_path(target)
        assert_one_line_issues(report)
        if mutation[0] in ("truncate", "garbage"):
            assert not report.ok, f"{mutation[0]} of {os.path.basename(target)} went unnoticed"
    finally:
        shutil.rmtree(directory)


@settings(FUZZ, max_examples=150)
@given(name=st.sampled_from(CONTRACT_NAMES), mutation=mutations)
def test_damaged_manifest_never_crashes(name, mutation):
    directory = copy_of(name)
    try:
        mpath = os.path.join(directory, "manifest.json")
        size = os.path.getsize(mpath)
        if not mutate(mpath, mutation):
            return
        report = validate_path(directory)
        assert_one_line_issues(report)
        cut_inside_json = mutation[0] == "truncate" and int(mutation[1] * size) < size - 1
        if cut_inside_json or mutation[0] == "garbage":
            assert not report.ok
    finally:
        shutil.rmtree(directory)


@settings(FUZZ, max_examples=100)
@given(data=st.binary(max_size=300), suffix=st.sampled_from([".arrow", ".parquet", ".bin", ".idx"]))
def test_garbage_files_of_every_kind_are_invalid(data, suffix):
    directory = tempfile.mkdtemp()
    try:
        path = os.path.join(directory, f"x{suffix}")
        open(path, "wb").write(data)
        if suffix in (".bin", ".idx"):
            partner = path[:-4] + (".idx" if suffix == ".bin" else ".bin")
            open(partner, "wb").write(data[::-1])
        report = validate_path(path)
        assert not report.ok
        assert_one_line_issues(report)
    finally:
        shutil.rmtree(directory)


def test_unreadable_directory_is_reported(tmp_path):
    directory = make_dataset(str(tmp_path / "d"), "sft", shards=1)
    os.remove(os.path.join(directory, "manifest.json"))
    report = validate_path(directory)
    assert not report.ok and "missing manifest.json" in str(report.issues[0])
