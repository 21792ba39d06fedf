#!/usr/bin/env bash
# A kind cluster with fake H100, A100 and L4 GPU nodes in two regions,
# joulepool installed from this checkout, and an example pool served by the
# fake engine.
#
#   kind/up.sh             create (or reuse) the cluster and install
#   kind/up.sh --dry-run   print the commands, run nothing
#
# Needs docker, kind (>= 0.20), kubectl and helm (>= 3.8). The README's
# "Try it on kind" lists exactly the commands `kind/up.sh --dry-run` prints
# (tests/chart/test_kind.py checks it). kind/down.sh deletes the cluster.
set -euo pipefail
cd "$(dirname "$0")/.."

CLUSTER=joulepool          # kind/cluster.yaml names it
CONTEXT=kind-$CLUSTER
IMAGE=joulepool:dev        # kind/values.yaml installs this tag
NAMESPACE=joulepool-system
RELEASE=joulepool
POOL=examples/kind-chat-pool.yaml

DRY_RUN=0
case "${1:-}" in
  --dry-run) DRY_RUN=1 ;;
  "") ;;
  *) echo "usage: kind/up.sh [--dry-run]" >&2; exit 2 ;;
esac

run() {
  echo "$*"
  if [ "$DRY_RUN" = 0 ]; then "$@"; fi
}

if [ "$DRY_RUN" = 0 ]; then
  for tool in docker kind kubectl helm; do
    command -v "$tool" >/dev/null || { echo "kind/up.sh: $tool is not installed" >&2; exit 1; }
  done
  docker info >/dev/null 2>&1 || { echo "kind/up.sh: the docker daemon is not reachable" >&2; exit 1; }
fi

existing=0
if [ "$DRY_RUN" = 0 ] && kind get clusters 2>/dev/null | grep -qx "$CLUSTER"; then
  existing=1
  echo "# kind cluster $CLUSTER exists: reusing it"
else
  run kind create cluster --name "$CLUSTER" --config kind/cluster.yaml --wait 180s
fi

run docker build -t "$IMAGE" .
run kind load docker-image "$IMAGE" --name "$CLUSTER"
run helm upgrade --install "$RELEASE" charts/joulepool --kube-context "$CONTEXT" \
  --namespace "$NAMESPACE" --create-namespace --values kind/values.yaml --wait --timeout 5m

if [ "$existing" = 1 ]; then
  # same tag, new image: restart what runs it
  run kubectl --context "$CONTEXT" --namespace "$NAMESPACE" rollout restart deployment,daemonset \
    --selector "app.kubernetes.io/instance=$RELEASE"
  run kubectl --context "$CONTEXT" --namespace "$NAMESPACE" rollout status deployment,daemonset \
    --selector "app.kubernetes.io/instance=$RELEASE" --timeout 5m
fi

run kubectl --context "$CONTEXT" apply -f "$POOL"
run kubectl --context "$CONTEXT" --namespace default wait jpool/chat \
  --for=condition=Planned --timeout=120s
run kubectl --context "$CONTEXT" --namespace default wait jpool/chat \
  --for=condition=Ready --timeout=300s

if [ "$DRY_RUN" = 0 ]; then
  cat <<MSG

joulepool is up on kind cluster "$CLUSTER" (context $CONTEXT).
  kubectl get jpool -A
  kubectl get pods -A -l joulepool.dev/pool -o wide
  kubectl -n $NAMESPACE port-forward svc/$RELEASE-router 8888
  pytest -m e2e tests/e2e     # end-to-end tests against this cluster
  kind/down.sh                # delete the cluster
MSG
fi
