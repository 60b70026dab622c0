"""Fingerprints: stable, method-bound, blind to request_id (no I/O)."""

from __future__ import annotations

from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from classmesh.core.idempotency import fingerprint, fingerprint_message


def _request_class() -> Any:
    fdp = descriptor_pb2.FileDescriptorProto(
        name="fp_test.proto", package="fptest", syntax="proto3"
    )
    msg = fdp.message_type.add(name="CreateThingRequest")
    msg.field.add(name="request_id", number=1, type=9, label=1)  # string
    msg.field.add(name="title", number=2, type=9, label=1)
    entry = msg.nested_type.add(name="LabelsEntry")
    entry.options.map_entry = True
    entry.field.add(name="key", number=1, type=9, label=1)
    entry.field.add(name="value", number=2, type=9, label=1)
    msg.field.add(
        name="labels",
        number=3,
        type=11,
        label=3,
        type_name=".fptest.CreateThingRequest.LabelsEntry",
    )
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("fptest.CreateThingRequest"))


Request = _request_class()
METHOD = "/classmesh.session.v1.SessionService/CreateSession"


def test_fingerprint_is_sha256_sized_and_stable() -> None:
    assert len(fingerprint(METHOD, b"abc")) == 32
    assert fingerprint(METHOD, b"abc") == fingerprint(METHOD, b"abc")
    assert fingerprint(METHOD, b"abc") != fingerprint(METHOD, b"abd")


def test_fingerprint_binds_the_method() -> None:
    assert fingerprint(METHOD, b"abc") != fingerprint(METHOD + "X", b"abc")
    # the separator keeps method/body boundaries apart
    assert fingerprint("ab", b"c") != fingerprint("a", b"bc")


def test_fingerprint_message_ignores_request_id() -> None:
    a = Request(request_id="one", title="Algebra")
    b = Request(request_id="two", title="Algebra")
    c = Request(request_id="one", title="Geometry")
    assert fingerprint_message(METHOD, a) == fingerprint_message(METHOD, b)
    assert fingerprint_message(METHOD, a) != fingerprint_message(METHOD, c)
    assert a.request_id == "one"  # the caller's message is left untouched


def test_fingerprint_message_is_deterministic_for_maps() -> None:
    a = Request(title="t")
    b = Request(title="t")
    for k in "abcdefghij":
        a.labels[k] = k
    for k in reversed("abcdefghij"):
        b.labels[k] = k
    assert fingerprint_message(METHOD, a) == fingerprint_message(METHOD, b)
