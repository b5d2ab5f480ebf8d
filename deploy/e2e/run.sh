#!/bin/sh
# Ferry's end-to-end suite on a real cluster: the current kubectl context, with kube-proxy
# removed and Ferry installed from deploy/ (see deploy/README.md). Creates namespace ferry-e2e,
# checks the Service behaviours below from a pod and from the nodes, and deletes the namespace.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
k() { kubectl "$@"; }
fail() { echo "FAIL: $*"; k -n ferry-e2e get pods,svc,endpointslices -o wide || true; exit 1; }
cleanup() { k delete namespace ferry-e2e --ignore-not-found --wait=false >/dev/null; }
trap cleanup EXIT

k -n kube-system rollout status daemonset/ferry --timeout=180s
if k -n kube-system get daemonset kube-proxy >/dev/null 2>&1; then fail "kube-proxy is still installed"; fi
k apply -f "$here/workload.yaml"
k -n ferry-e2e rollout status deployment/echo --timeout=180s
k -n ferry-e2e wait --for=condition=Ready pod/client --timeout=180s
ex() { k -n ferry-e2e exec client -- "$@"; }

echo "ClusterIP spreads over every endpoint"
names=$(for i in $(seq 1 30); do ex curl -s -m 2 http://echo/hostname; echo; done | sort -u | grep -c . || true)
[ "$names" -eq 3 ] || fail "ClusterIP reached $names of 3 endpoints"

echo "UDP ClusterIP answers"
ex sh -c 'echo hostname | nc -u -w 2 echo 81' | grep -q echo || fail "UDP ClusterIP"

echo "sessionAffinity ClientIP sticks"
sticky=$(for i in $(seq 1 10); do ex curl -s -m 2 http://echo-sticky/hostname; echo; done | sort -u | grep -c .)
[ "$sticky" -eq 1 ] || fail "ClientIP affinity reached $sticky endpoints"

echo "a Service without endpoints refuses at once"
if ex curl -s -m 2 http://nothing/ >/dev/null; then fail "no-endpoint Service answered"; fi

echo "NodePort (Cluster) from every node address"
for ip in $(k get nodes -o jsonpath='{.items[*].status.addresses[?(@.type=="InternalIP")].address}'); do
  ex curl -s -m 2 "http://$ip:30080/hostname" >/dev/null || fail "NodePort 30080 on $ip"
done

echo "NodePort (Local) keeps the client address"
node=$(k -n ferry-e2e get pod -l app=echo -o jsonpath='{.items[0].status.hostIP}')
src=$(ex curl -s -m 2 "http://$node:30081/clientip" | cut -d: -f1)
me=$(k -n ferry-e2e get pod client -o jsonpath='{.status.podIP}')
[ "$src" = "$me" ] || fail "ETP Local saw $src, client is $me"

echo "Ferry's own view: readiness, metrics, inspection"
pod=$(k -n kube-system get pod -l app.kubernetes.io/name=ferry -o jsonpath='{.items[0].metadata.name}')
k -n kube-system exec "$pod" -- dataplane-agent inspect services | grep -q 'ferry-e2e/echo:http' || fail "inspect services"
k -n kube-system exec "$pod" -- dataplane-agent inspect backends | grep -q 'ferry-e2e/echo:http' || fail "inspect backends"
echo "all checks passed"
