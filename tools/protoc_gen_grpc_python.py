"""protoc plugin that produces `*_pb2_grpc.py` by handing the request to grpc_tools.

grpc_tools ships the gRPC Python generator only inside its bundled protoc, not as a
standalone plugin binary; buf needs a plugin. This script reads buf's
CodeGeneratorRequest, writes the request's files to a temporary tree, and runs
`grpc_tools.protoc --grpc_python_out` over them, returning the produced files.
"""

from __future__ import annotations

import os
import sys
import tempfile

from google.protobuf import descriptor_pb2
from google.protobuf.compiler import plugin_pb2
from grpc_tools import protoc


def main() -> int:
    request = plugin_pb2.CodeGeneratorRequest.FromString(sys.stdin.buffer.read())
    response = plugin_pb2.CodeGeneratorResponse()
    response.supported_features = plugin_pb2.CodeGeneratorResponse.FEATURE_PROTO3_OPTIONAL
    with tempfile.TemporaryDirectory() as tmp:
        fds = descriptor_pb2.FileDescriptorSet(file=list(request.proto_file))
        set_path = os.path.join(tmp, "set.pb")
        with open(set_path, "wb") as fh:
            fh.write(fds.SerializeToString())
        out_dir = os.path.join(tmp, "out")
        os.makedirs(out_dir)
        args = [
            "grpc_tools.protoc",
            f"--descriptor_set_in={set_path}",
            f"--grpc_python_out={out_dir}",
            *request.file_to_generate,
        ]
        if protoc.main(args) != 0:
            response.error = "grpc_tools.protoc failed"
        else:
            for root, _dirs, files in os.walk(out_dir):
                for name in sorted(files):
                    full = os.path.join(root, name)
                    out = response.file.add()
                    out.name = os.path.relpath(full, out_dir)
                    with open(full, encoding="utf-8") as fh:
                        out.content = fh.read()
    sys.stdout.buffer.write(response.SerializeToString())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
