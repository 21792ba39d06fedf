#!/usr/bin/env bash
# Delete the kind cluster that kind/up.sh created (and everything in it).
set -euo pipefail
CLUSTER=joulepool
command -v kind >/dev/null || { echo "kind/down.sh: kind is not installed" >&2; exit 1; }
if kind get clusters 2>/dev/null | grep -qx "$CLUSTER"; then
  kind delete cluster --name "$CLUSTER"
else
  echo "kind/down.sh: no kind cluster named $CLUSTER"
fi
