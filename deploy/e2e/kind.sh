#!/usr/bin/env bash
# gpufleet end to end on a real cluster: kind (CPU only), the Helm chart, a llama.cpp Model,
# one request through the gateway. Needs docker, kind, kubectl, helm and internet access (the
# engine image and the model's weights are pulled in the cluster). About 10 minutes.
# Not run by CI (no cluster there); the objects it creates are validated by the unit tests.
set -euo pipefail
cd "$(dirname "$0")/../.."
NS=gpufleet
CLUSTER=${CLUSTER:-gpufleet-e2e}

kind create cluster --name "$CLUSTER"
docker build -t ghcr.io/gpufleet/gpufleet:e2e .
kind load docker-image ghcr.io/gpufleet/gpufleet:e2e --name "$CLUSTER"

kubectl create namespace "$NS"
kubectl -n "$NS" apply -f deploy/e2e/datastores.yaml
kubectl -n "$NS" rollout status deploy/postgres deploy/redis --timeout=5m

helm install gf deploy/helm/gpufleet -n "$NS" \
  --set image.tag=e2e \
  --set store.url=postgresql+psycopg://gpufleet:demo-only@postgres:5432/gpufleet \
  --set redis.url=redis://redis:6379/0 \
  --set modelCache.accessMode=ReadWriteOnce --set modelCache.size=5Gi
kubectl -n "$NS" rollout status deploy/gf-operator deploy/gf-gateway --timeout=5m

kubectl -n "$NS" apply -f deploy/e2e/model.yaml
kubectl -n "$NS" wait --for=jsonpath='{.status.readyReplicas}'=1 model/smollm2 --timeout=15m
kubectl -n "$NS" get models

KEY=$(kubectl -n "$NS" logs deploy/gf-gateway | grep -o 'gpf_[A-Za-z0-9_-]*' | head -1)
kubectl -n "$NS" port-forward svc/gf-gateway 8000:80 >/dev/null &
trap 'kill %1' EXIT
sleep 3
curl -sf http://127.0.0.1:8000/v1/chat/completions \
  -H "authorization: Bearer $KEY" -H 'content-type: application/json' \
  -d '{"model": "smollm2", "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 16}'
echo
echo "ok — delete with: kind delete cluster --name $CLUSTER"
