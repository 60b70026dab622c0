"""Generate the typed per-service clients of the Python SDK from the proto descriptors.

Reads a FileDescriptorSet with source info (from `buf build -o -`) on stdin and writes
`sdk/python/classmesh_sdk/_generated.py`: one `<Service>Client` class per service, one
snake_case method per RPC, carrying the RPC's proto comment as its docstring. `make gen`
runs it; the output is committed and never edited.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from google.protobuf import descriptor_pb2

OUT = Path(__file__).resolve().parent.parent / "sdk/python/classmesh_sdk/_generated.py"
SERVICE_ORDER = ["session", "media", "breakout", "interaction", "recording", "admin"]


def snake(name: str) -> str:
    s = re.sub(r"(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", s).lower()


def module_alias(file_name: str) -> tuple[str, str]:
    # classmesh/session/v1/session_service.proto -> (classmesh.session.v1, session_service_pb2)
    parts = file_name[: -len(".proto")].split("/")
    return ".".join(parts[:-1]), parts[-1] + "_pb2"


def comments(fd: descriptor_pb2.FileDescriptorProto) -> dict[tuple[int, ...], str]:
    out: dict[tuple[int, ...], str] = {}
    for loc in fd.source_code_info.location:
        text = loc.leading_comments.strip()
        if text:
            out[tuple(loc.path)] = text
    return out


def docstring(text: str, indent: str) -> str:
    text = text.replace('"""', "'''").replace("\\", "\\\\")
    lines = [ln.rstrip() for ln in text.splitlines()]
    if len(lines) == 1:
        return f'{indent}"""{lines[0]}"""\n'
    body = "\n".join((indent + ln) if ln else "" for ln in lines[1:])
    return f'{indent}"""{lines[0]}\n{body}\n{indent}"""\n'


def _walk(
    messages: dict[str, tuple[str, descriptor_pb2.DescriptorProto, str]],
    mod: str,
    file_name: str,
    prefix: str,
    pyprefix: str,
    descs: list[descriptor_pb2.DescriptorProto],
) -> None:
    for d in descs:
        full = f"{prefix}.{d.name}"
        pyname = f"{pyprefix}{d.name}"
        messages[full] = (f"{mod}.{pyname}", d, file_name)
        _walk(messages, mod, file_name, full, pyname + ".", list(d.nested_type))


def main() -> int:
    fds = descriptor_pb2.FileDescriptorSet.FromString(sys.stdin.buffer.read())
    messages: dict[str, tuple[str, descriptor_pb2.DescriptorProto, str]] = {}
    for f in fds.file:
        pkg, mod = module_alias(f.name)

        _walk(messages, mod, f.name, "." + f.package, "", list(f.message_type))

    imports: set[tuple[str, str]] = set()
    classes: list[str] = []
    facade: list[tuple[str, str]] = []
    service_files = [
        f
        for f in fds.file
        if f.service and f.name.startswith("classmesh/") and f.name.endswith("_service.proto")
    ]
    service_files.sort(
        key=lambda f: (
            SERVICE_ORDER.index(f.package.split(".")[1])
            if f.package.split(".")[1] in SERVICE_ORDER
            else 99
        )
    )
    for f in service_files:
        notes = comments(f)
        for si, svc in enumerate(f.service):
            cls = f"{svc.name}Client"
            short = f.package.split(".")[1]
            facade.append((short, cls))
            body: list[str] = []
            body.append(f"class {cls}(ServiceClient):\n")
            body.append(docstring(notes.get((6, si), f"Client of {svc.name}."), "    "))
            body.append("\n")
            for mi, m in enumerate(svc.method):
                req_py, req_d, req_file = messages[m.input_type]
                resp_py, _, resp_file = messages[m.output_type]
                imports.add(module_alias(req_file))
                imports.add(module_alias(resp_file))
                fields = {fl.name for fl in req_d.field}
                read_only = (
                    m.options.idempotency_level == descriptor_pb2.MethodOptions.NO_SIDE_EFFECTS
                )
                const = "_" + snake(m.name).upper()
                path = f"/{f.package}.{svc.name}/{m.name}"
                body.append(
                    f"    {const} = MethodInfo(\n"
                    f"        path={path!r},\n"
                    f"        request_type={req_py},\n"
                    f"        response_type={resp_py},\n"
                    f"        server_streaming={m.server_streaming},\n"
                    f"        client_streaming={m.client_streaming},\n"
                    f"        read_only={read_only},\n"
                    f"        has_request_id={'request_id' in fields},\n"
                    f"        has_after_seq={'after_seq' in fields},\n"
                    f"    )\n\n"
                )
                doc = notes.get((6, si, 2, mi), f"Calls {m.name}.")
                name = snake(m.name)
                if m.client_streaming:
                    body.append(
                        f"    def {name}(\n"
                        f"        self, *, timeout: float | None = DEFAULT, metadata: Metadata | None = None\n"
                        f"    ) -> grpc.aio.StreamStreamCall[{req_py}, {resp_py}]:\n"
                    )
                    body.append(docstring(doc, "        "))
                    body.append(
                        f"        return self._stream_stream(self.{const}, timeout=timeout, metadata=metadata)\n\n"
                    )
                    continue
                sig = (
                    f"        self,\n"
                    f"        request: {req_py} | None = None,\n"
                    f"        /,\n"
                    f"        *,\n"
                    f"        timeout: float | None = DEFAULT,\n"
                    f"        metadata: Metadata | None = None,\n"
                    f"        retry: Retry | None = DEFAULT,\n"
                    f"        **fields: Any,\n"
                )
                build = f"        req = request if request is not None else {req_py}(**fields)\n"
                if m.server_streaming:
                    body.append(f"    def {name}(\n{sig}    ) -> AsyncIterator[{resp_py}]:\n")
                    body.append(docstring(doc, "        "))
                    body.append(build)
                    body.append(
                        f"        return self._server_stream(\n"
                        f"            self.{const}, req, timeout=timeout, metadata=metadata, retry=retry\n"
                        f"        )\n\n"
                    )
                else:
                    body.append(f"    async def {name}(\n{sig}    ) -> {resp_py}:\n")
                    body.append(docstring(doc, "        "))
                    body.append(build)
                    body.append(
                        f"        result: {resp_py} = await self._unary(\n"
                        f"            self.{const}, req, timeout=timeout, metadata=metadata, retry=retry\n"
                        f"        )\n"
                        f"        return result\n\n"
                    )
            classes.append("".join(body).rstrip() + "\n")

    out = [
        "# Generated by tools/gen_sdk.py from proto/ (make gen). Do not edit.\n",
        '"""Typed clients, one per ClassMesh service, one method per RPC."""\n\n',
        "from __future__ import annotations\n\n",
        "from collections.abc import AsyncIterator\n",
        "from typing import Any\n\n",
        "import grpc\n\n",
    ]
    for pkg, mod in sorted(imports):
        out.append(f"from {pkg} import {mod}\n")
    out.append("\nfrom classmesh_sdk._base import DEFAULT, Metadata, MethodInfo, ServiceClient\n")
    out.append("from classmesh_sdk._retry import Retry\n\n")
    names = [c for _, c in facade]
    out.append(f"__all__ = {names!r}\n\n\n")
    out.append("\n\n".join(classes))
    OUT.write_text("".join(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
