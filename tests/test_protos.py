"""The committed gRPC stubs are exactly what grpcio-tools generates from the proto now, and the
ranking responses carry IDs and scores only."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf.descriptor import Descriptor

from server.api import privrank_pb2

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "protos" / "privrank" / "v1"
API_DIR = ROOT / "server" / "api"
GENERATED = ("privrank_pb2.py", "privrank_pb2_grpc.py", "privrank_pb2.pyi")

# field names that would carry item text, user attributes or contact details
FORBIDDEN = re.compile(
    r"text|title|name|email|description|address|phone|body|content|label|feature|attribute",
    re.IGNORECASE,
)


@pytest.fixture(scope="module")
def regenerated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Run the `make protos` invocation with this interpreter, into a temporary directory."""
    out = tmp_path_factory.mktemp("protos")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            "-Iserver/api=protos/privrank/v1",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            f"--pyi_out={out}",
            "server/api/privrank.proto",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, f"protoc failed:\n{result.stdout}\n{result.stderr}"
    return out / "server" / "api"


@pytest.mark.parametrize("name", GENERATED)
def test_generated_stubs_are_up_to_date(regenerated: Path, name: str) -> None:
    fresh = regenerated / name
    assert fresh.is_file(), f"protoc did not write {name}"
    committed = API_DIR / name
    assert committed.is_file(), f"server/api/{name} is missing: run `make protos`"
    assert committed.read_bytes() == fresh.read_bytes(), (
        f"server/api/{name} differs from what grpcio-tools generates from "
        f"{PROTO_DIR.relative_to(ROOT)}/privrank.proto: run `make protos` and commit the result"
    )


def test_no_stray_generated_files(regenerated: Path) -> None:
    assert sorted(p.name for p in regenerated.iterdir()) == sorted(GENERATED)


def field_names(message: Descriptor) -> set[str]:
    return {f.name for f in message.fields}


def test_ranked_items_carry_ids_and_scores_only() -> None:
    messages = privrank_pb2.DESCRIPTOR.message_types_by_name
    # variant: the A/B bucket label, never user data
    assert field_names(messages["RankedItems"]) == {"items", "model_version", "source", "variant"}
    assert field_names(messages["ScoredItem"]) == {"item_id", "score"}


def reachable(message: Descriptor, seen: dict[str, Descriptor]) -> dict[str, Descriptor]:
    """``message`` and every message type nested in its fields, by full name."""
    if message.full_name in seen:
        return seen
    seen[message.full_name] = message
    for f in message.fields:
        if f.message_type is not None:
            reachable(f.message_type, seen)
    return seen


def test_ranking_responses_have_no_personal_or_text_fields() -> None:
    service = privrank_pb2.DESCRIPTOR.services_by_name["Ranking"]
    messages: dict[str, Descriptor] = {}
    for method in service.methods:
        reachable(method.output_type, messages)
    assert "privrank.v1.RankedItems" in messages
    assert "privrank.v1.ScoredItem" in messages
    offending = [
        f"{full_name}.{name}"
        for full_name, message in sorted(messages.items())
        for name in sorted(field_names(message))
        if FORBIDDEN.search(name)
    ]
    assert offending == [], f"response fields that could leak text or personal data: {offending}"


def test_proto_source_response_messages() -> None:
    # the same, read from the .proto source the stubs are generated from
    source = (PROTO_DIR / "privrank.proto").read_text()

    def fields_of(message: str) -> set[str]:
        match = re.search(rf"^message {message} \{{(.*?)^\}}", source, re.MULTILINE | re.DOTALL)
        assert match, f"message {message} not found in privrank.proto"
        body = re.sub(r"//.*", "", match.group(1))
        return set(re.findall(r"(\w+)\s*=\s*\d+\s*;", body))

    assert fields_of("RankedItems") == {"items", "model_version", "source", "variant"}
    assert fields_of("ScoredItem") == {"item_id", "score"}
