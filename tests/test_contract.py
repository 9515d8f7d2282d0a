"""The contract: generated code is fresh, and the protos keep buf-style hygiene."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2

ROOT = Path(__file__).resolve().parent.parent
PROTOS = sorted((ROOT / "protos" / "sluice" / "v1").glob("*.proto"))
GENERATED = ROOT / "sluice" / "v1"


def _protoc(*args: str) -> None:
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", "-I", str(ROOT / "protos"), *args,
         *[str(p) for p in PROTOS]],
        check=True,
        cwd=ROOT,
    )  # fmt: skip


def test_generated_code_matches_protos(tmp_path: Path) -> None:
    """Regenerating from protos/ changes nothing in sluice/v1 (run `make protos` if it fails)."""
    _protoc(f"--python_out={tmp_path}", f"--pyi_out={tmp_path}", f"--grpc_python_out={tmp_path}")
    fresh = {p.name: p.read_bytes() for p in (tmp_path / "sluice" / "v1").iterdir()}
    committed = {p.name: p.read_bytes() for p in GENERATED.iterdir() if p.name in fresh}
    assert set(fresh) == set(committed), "generated files missing from sluice/v1"
    stale = sorted(name for name in fresh if fresh[name] != committed[name])
    assert not stale, f"stale generated code, run `make protos`: {stale}"


@pytest.fixture(scope="module")
def descriptors(tmp_path_factory: pytest.TempPathFactory) -> descriptor_pb2.FileDescriptorSet:
    out = tmp_path_factory.mktemp("fds") / "set.pb"
    _protoc(f"--descriptor_set_out={out}", "--include_source_info")
    return descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())


def test_protos_are_versioned_and_not_named_like_etcd_protos(
    descriptors: descriptor_pb2.FileDescriptorSet,
) -> None:
    """Every file is in package sluice.v1 under sluice/v1/ (never a root rpc/kv/auth.proto)."""
    for file in descriptors.file:
        assert file.package == "sluice.v1", file.name
        assert file.name.startswith("sluice/v1/"), file.name


def test_enums_start_with_unspecified_zero(descriptors: descriptor_pb2.FileDescriptorSet) -> None:
    """Every enum's zero value is <ENUM>_UNSPECIFIED and every value carries the enum prefix."""
    for file in descriptors.file:
        for enum in file.enum_type:
            prefix = "".join("_" + c if c.isupper() else c.upper() for c in enum.name).lstrip("_")
            assert enum.value[0].number == 0
            assert enum.value[0].name == f"{prefix}_UNSPECIFIED", enum.name
            for value in enum.value:
                assert value.name.startswith(prefix + "_"), value.name


def test_field_numbers_are_unique(descriptors: descriptor_pb2.FileDescriptorSet) -> None:
    """No message reuses a field number (reserved ranges included)."""
    for file in descriptors.file:
        for message in file.message_type:
            numbers = [f.number for f in message.field]
            reserved = [n for r in message.reserved_range for n in range(r.start, r.end)]
            assert len(numbers) == len(set(numbers)), message.name
            assert not set(numbers) & set(reserved), message.name


def test_every_element_is_commented(descriptors: descriptor_pb2.FileDescriptorSet) -> None:
    """Every message, field, enum, enum value, service and method has a leading comment."""
    missing = []
    for file in descriptors.file:
        commented = {
            tuple(loc.path)
            for loc in file.source_code_info.location
            if loc.leading_comments.strip()
        }
        paths: list[tuple[tuple[int, ...], str]] = []
        for i, msg in enumerate(file.message_type):
            paths.append(((4, i), msg.name))
            paths += [((4, i, 2, j), f"{msg.name}.{f.name}") for j, f in enumerate(msg.field)]
        for i, enum in enumerate(file.enum_type):
            paths.append(((5, i), enum.name))
            paths += [((5, i, 2, j), v.name) for j, v in enumerate(enum.value)]
        for i, svc in enumerate(file.service):
            paths.append(((6, i), svc.name))
            paths += [((6, i, 2, j), f"{svc.name}.{m.name}") for j, m in enumerate(svc.method)]
        missing += [f"{file.name}: {name}" for path, name in paths if path not in commented]
    assert not missing, missing
