#!/usr/bin/env bash
# Regenerate the kubelet device plugin v1beta1 Python stubs from
# src/joulepool/protos/api.proto, and the kubelet pod resources v1
# stubs (used by the node agent) from .../podresources.proto. The generated
# files are committed:
# the runtime needs grpcio and protobuf only, never grpcio-tools.
#
#   scripts/gen_proto.sh            # uses .venv/bin/python (pip install -e '.[test]')
#   PYTHON=python3 scripts/gen_proto.sh
#
# Protos are compiled with the include root at src/, so the generated
# *_grpc.py imports `joulepool.protos.api_pb2` (a package path)
# instead of a bare `api_pb2`. The proto package stays `v1beta1`, so the gRPC
# method names on the wire are the kubelet's (/v1beta1.Registration/Register).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
"$PYTHON" -m grpc_tools.protoc \
  -I src \
  --python_out=src \
  --pyi_out=src \
  --grpc_python_out=src \
  src/joulepool/protos/api.proto \
  src/joulepool/protos/podresources.proto
echo "generated: $(ls src/joulepool/protos/*_pb2*)"
