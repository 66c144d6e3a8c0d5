#!/usr/bin/env bash
# Acceptance check of the real node, end to end, on a throwaway cluster: start it with LFT_REAL_NODE=1, import the
# Debian base image, and check that
#   - a pod prints 42 and `kubectl logs` returns it; `kubectl exec` works
#   - a pod over its 64Mi memory limit ends OOMKilled
#   - two pods behind a headless Service reach each other by <host>.<subdomain>.<ns>.svc.cluster.local, and a client
#     reaches them through a ClusterIP Service (kube-proxy) and the outside world's DNS through CoreDNS
#   - a pod reaches the API server in-cluster (KUBERNETES_SERVICE_HOST/PORT and kubernetes.default.svc) with its
#     ServiceAccount token, verifying the server with the mounted ca.crt
#   - a pod that satisfies the "restricted" Pod Security Standard (non-root, seccomp RuntimeDefault, no capabilities)
#     runs in a namespace that enforces it
#   - the kwok GPU nodes are still kwok's and the real node is not; a second real node is refused
# then stop it with down.sh and diff the host (iptables, links, sysctls, mounts, netns, cgroups, paths) against what
# it was before. Prints timings; exits non-zero on any failed check or host difference.
#
#   hack/cluster/node/smoke.sh            (root; cold, the binaries are built first: hack/cluster/build.sh)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cluster=$(cd "$here/.." && pwd)
. "$here/env.sh"
NAME=${1:-lft-smoke}
export LFT_CLUSTER_WORK=${LFT_CLUSTER_WORK:-$(mktemp -d /tmp/lft-smoke.XXXXXX)}
WORK=$LFT_CLUSTER_WORK
OUT=$WORK/smoke
mkdir -p "$OUT"
NS=smoke
failures=0
say() { echo "[smoke $(date +%T)] $*" >&2; }
check() { if eval "$2"; then say "PASS $1"; else say "FAIL $1"; failures=$((failures + 1)); fi; }
since() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN {printf "%.1f", b - a}'; }

# --- host state, before and after ----------------------------------------------------------------------------------
# (podman's and buildah's own mounts and cgroups are someone else's business: a build may run beside this check)
# sysctls that change by themselves
VOLATILE='^(fs\.(dentry-state|file-nr|inode-nr|inode-state|quota\.)|kernel\.(random\.|ns_last_pid|pty\.nr|sched_)'
VOLATILE+='|net\.netfilter\.nf_conntrack_count|net\.ipv[46]\.route\.)'
snapshot() {
  local d=$OUT/$1; mkdir -p "$d"
  for ipt in iptables ip6tables; do "$ipt-save" | sed -e '/^#/d' -e 's/\[[0-9]*:[0-9]*\]//' > "$d/$ipt"; done
  ip -br link | awk '{print $1, $2}' | sort > "$d/links"
  ip -br addr | sort > "$d/addrs"
  sysctl -a 2>/dev/null | grep -Ev "$VOLATILE" | sort > "$d/sysctl"
  sed -e '/lorafinetune\/podman/d' -e '/lorafinetune-podman/d' /proc/self/mounts | sort > "$d/mounts"
  ls /run/netns 2>/dev/null | sort > "$d/netns" || true
  find /sys/fs/cgroup -maxdepth 2 -type d | sed -e '/buildah/d' -e '/libpod/d' | sort > "$d/cgroups"
  { python3 "$here/netfilter.py" nfacct-list; python3 "$here/netfilter.py" tables; } | sort > "$d/netfilter"
  ls -d /run/containerd /run/netns /var/lib/cni /var/log/containers /var/log/pods /var/lib/kubelet /etc/cni \
    /opt/cni /opt/containerd /etc/kubernetes /usr/libexec/kubernetes /run/runc 2>/dev/null | sort > "$d/paths" || true
}

snapshot before
BIN=$("$cluster/build.sh")
export PATH="$BIN:$PATH"
say "starting the cluster with a real node (work dir $WORK)"
t0=$(date +%s.%N)
down() { "$cluster/down.sh" "$NAME" 2>> "$OUT/down.log"; }
trap 'say "interrupted: stopping the cluster"; down' EXIT   # a failed step must not leave the node up
KUBECONFIG=$(LFT_REAL_NODE=1 "$cluster/up.sh" "$NAME" 2> "$OUT/up.log") || { cat "$OUT/up.log" >&2; exit 1; }
export KUBECONFIG
node_start=$(grep -o 'Ready in [0-9.]*s' "$OUT/up.log" | grep -o '[0-9.]*[0-9]' || echo '?')
say "up.sh: $(since "$t0") s in all, of which the node $node_start s"

check "a second real node is refused" \
  '! "$here/node-up.sh" --check 2> "$OUT/refused.log" && grep -q "already up" "$OUT/refused.log"'
ready='.status.conditions[?(@.type=="Ready")].status'
node=$(kubectl get node "$NODE_NAME" -o "jsonpath={$ready} {.metadata.labels.lorafinetune\.io/node} {.spec.taints}\
 {.status.nodeInfo.kubeletVersion} {.status.nodeInfo.containerRuntimeVersion}")
check "node $NODE_NAME Ready, labelled, untainted, kubelet v1.37 on containerd (got: $node)" \
  '[ "$node" = "True real  v1.37.2 containerd://1.6.20" ]'
kwok=$(kubectl get nodes -l type=kwok -o "jsonpath={.items[*]$ready}")
only_fake=--manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake
check "kwok still runs gpu-node-0/1, and only the nodes annotated kwok.x-k8s.io/node=fake" \
  '[ "$kwok" = "True True" ] && pgrep -f "kwok-controller .*--manage-all-nodes=false.*$only_fake" >/dev/null'

BASE=$("$here/base-image.sh")
ctr -a "$WORK/node/containerd.sock" -n k8s.io images ls -q | grep -x localhost/debian-python:bookworm >/dev/null &&
  say "base image already in the persistent image store ($NODE_CONTAINERD_ROOT); importing again anyway"
t2=$(date +%s.%N)
"$here/import-image.sh" "$WORK/node/containerd.sock" "$BASE"
say "base image imported in $(since "$t2") s"

kubectl create namespace "$NS" >/dev/null
kubectl -n "$NS" apply -f - >/dev/null <<'EOF'
apiVersion: v1
kind: Pod
metadata: {name: print42}
spec:
  nodeSelector: {lorafinetune.io/node: real}
  restartPolicy: Never
  containers:
  - {name: main, image: "localhost/debian-python:bookworm", imagePullPolicy: Never, command: [python3, -c, "print(42)"]}
---
apiVersion: v1
kind: Pod
metadata: {name: oom}
spec:
  nodeSelector: {lorafinetune.io/node: real}
  restartPolicy: Never
  containers:
  - name: main
    image: localhost/debian-python:bookworm
    imagePullPolicy: Never
    command: [python3, -c, "b = bytearray(400 * 1024 * 1024); print('allocated', len(b))"]
    resources: {limits: {memory: 64Mi, cpu: 500m}}
---
apiVersion: v1
kind: Service
metadata: {name: hl}
spec:
  clusterIP: None
  selector: {app: hl}
  ports: [{name: http, port: 8000}]
---
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  selector: {app: hl}
  ports: [{name: http, port: 80, targetPort: 8000}]
---
apiVersion: v1
kind: Pod
metadata: {name: w0, labels: {app: hl}}
spec:
  nodeSelector: {lorafinetune.io/node: real}
  hostname: w0
  subdomain: hl
  containers:
  - name: main
    image: localhost/debian-python:bookworm
    imagePullPolicy: Never
    command: [python3, -m, http.server, "8000"]
    readinessProbe: {tcpSocket: {port: 8000}, periodSeconds: 1}
---
apiVersion: v1
kind: Pod
metadata: {name: w1, labels: {app: hl}}
spec:
  nodeSelector: {lorafinetune.io/node: real}
  hostname: w1
  subdomain: hl
  containers:
  - name: main
    image: localhost/debian-python:bookworm
    imagePullPolicy: Never
    command: [python3, -m, http.server, "8000"]
    readinessProbe: {tcpSocket: {port: 8000}, periodSeconds: 1}
---
apiVersion: v1
kind: Pod
metadata: {name: in-cluster}
spec:
  nodeSelector: {lorafinetune.io/node: real}
  restartPolicy: Never
  containers:
  - name: main
    image: localhost/debian-python:bookworm
    imagePullPolicy: Never
    command:
    - python3
    - -c
    - |
      import json, os, ssl, urllib.request
      sa = "/var/run/secrets/kubernetes.io/serviceaccount"
      token = open(sa + "/token").read()
      ctx = ssl.create_default_context(cafile=sa + "/ca.crt")   # verifies the server certificate and its SANs
      def call(url, body=None):
          req = urllib.request.Request(url, headers={"Authorization": "Bearer " + token, "Content-Type": "application/json"},
                                       data=json.dumps(body).encode() if body else None)
          with urllib.request.urlopen(req, context=ctx, timeout=10) as r:
              return r.status, json.load(r)
      env = "https://%s:%s" % (os.environ["KUBERNETES_SERVICE_HOST"], os.environ["KUBERNETES_SERVICE_PORT"])
      for base in (env, "https://kubernetes.default.svc"):
          status, body = call(base + "/api")
          print("GET", base + "/api", status, body["versions"], body["serverAddressByClientCIDRs"])
      status, body = call("https://kubernetes.default.svc/apis/authentication.k8s.io/v1/selfsubjectreviews",
                          {"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"})
      print("whoami", status, body["status"]["userInfo"]["username"])
EOF
kubectl create namespace restricted >/dev/null
kubectl label namespace restricted pod-security.kubernetes.io/enforce=restricted >/dev/null
kubectl -n restricted apply -f - >/dev/null <<'EOF'
apiVersion: v1
kind: Pod
metadata: {name: nonroot}
spec:
  nodeSelector: {lorafinetune.io/node: real}
  restartPolicy: Never
  securityContext: {runAsNonRoot: true, runAsUser: 1000, runAsGroup: 1000, seccompProfile: {type: RuntimeDefault}}
  containers:
  - name: main
    image: localhost/debian-python:bookworm
    imagePullPolicy: Never
    command: [python3, -c, "import os; print('uid', os.getuid(), 'seccomp', open('/proc/self/status').read().split('Seccomp:')[1].split()[0])"]
    securityContext: {allowPrivilegeEscalation: false, capabilities: {drop: [ALL]}}
EOF
kubectl -n "$NS" wait --for=jsonpath='{.status.phase}'=Succeeded pod/print42 --timeout=180s >/dev/null || true
check "a pod prints 42 (kubectl logs)" '[ "$(kubectl -n "$NS" logs print42)" = 42 ]'
kubectl -n "$NS" wait --for=jsonpath='{.status.phase}'=Failed pod/oom --timeout=180s >/dev/null || true
oom=$(kubectl -n "$NS" get pod oom -o 'jsonpath={.status.containerStatuses[0].state.terminated}' |
  python3 -c 'import json, sys; t = json.load(sys.stdin); print(t["reason"], t["exitCode"])' || true)
check "a pod over its 64Mi limit ends OOMKilled (got: $oom)" '[ "$oom" = "OOMKilled 137" ]'
kubectl -n "$NS" wait --for=condition=Ready pod/w0 pod/w1 --timeout=180s >/dev/null || true
kubectl -n restricted wait --for=jsonpath='{.status.phase}'=Succeeded pod/nonroot --timeout=180s >/dev/null || true
check "a restricted pod runs (uid 1000, seccomp filter mode 2)" '[ "$(kubectl -n restricted logs nonroot)" = "uid 1000 seccomp 2" ]'
check "kubectl exec" '[ "$(kubectl -n "$NS" exec w0 -- python3 -c "print(6 * 7)")" = 42 ]'
kubectl -n "$NS" apply -f - >/dev/null <<'EOF'
apiVersion: v1
kind: Pod
metadata: {name: client}
spec:
  nodeSelector: {lorafinetune.io/node: real}
  restartPolicy: Never
  containers:
  - name: main
    image: localhost/debian-python:bookworm
    imagePullPolicy: Never
    command:
    - python3
    - -c
    - |
      import socket, urllib.request
      ns = open("/var/run/secrets/kubernetes.io/serviceaccount/namespace").read()
      print("hl ->", sorted({a[4][0] for a in socket.getaddrinfo("hl", 8000, proto=socket.IPPROTO_TCP)}))
      for h in ("w0.hl.%s.svc.cluster.local" % ns, "w1.hl.%s.svc.cluster.local" % ns):
          print(h, "->", socket.gethostbyname(h), "HTTP", urllib.request.urlopen("http://%s:8000/" % h, timeout=5).status)
      print("web ->", socket.gethostbyname("web"), "HTTP", urllib.request.urlopen("http://web/", timeout=5).status)
      print("external ->", socket.gethostbyname("deb.debian.org"))
EOF
for p in client in-cluster; do
  kubectl -n "$NS" wait --for=jsonpath='{.status.phase}'=Succeeded "pod/$p" --timeout=180s >/dev/null || true
  kubectl -n "$NS" logs "$p" > "$OUT/$p.log" 2>&1 || true
  sed "s/^/  $p| /" "$OUT/$p.log" >&2
done
check "headless Service FQDNs resolve and answer" \
  '[ "$(grep -c "svc.cluster.local -> 10.244.0.[0-9]* HTTP 200" "$OUT/client.log")" = 2 ]'
check "a ClusterIP Service answers (kube-proxy)" 'grep -q "^web -> 10.96.[0-9.]* HTTP 200" "$OUT/client.log"'
check "external names resolve through CoreDNS" 'grep -q "^external -> [0-9]" "$OUT/client.log"'
check "in-cluster API access with the ServiceAccount token and ca.crt" \
  '[ "$(grep -c "^GET https://.*/api 200" "$OUT/in-cluster.log")" = 2 ] &&
   grep -q "^whoami 201 system:serviceaccount:$NS:default" "$OUT/in-cluster.log"'
kubectl get endpointslices -n default -l kubernetes.io/service-name=kubernetes \
  -o 'jsonpath={.items[0].endpoints[0].addresses[0]}:{.items[0].ports[0].port}{"\n"}' |
  sed 's/^/  kubernetes Service endpoint: /' >&2

say "stopping the cluster"
trap - EXIT
t3=$(date +%s.%N)
down || { cat "$OUT/down.log" >&2; failures=$((failures + 1)); }
node_stop=$(grep -o 'restored in [0-9.]*s' "$OUT/down.log" | grep -o '[0-9.]*[0-9]' || echo '?')
say "down.sh: $(since "$t3") s in all, of which the node $node_stop s"
down || failures=$((failures + 1))   # twice: must be a no-op

snapshot after
diffs=0
for f in iptables ip6tables links addrs sysctl mounts netns cgroups netfilter paths; do
  if ! diff -u "$OUT/before/$f" "$OUT/after/$f" > "$OUT/$f.diff"; then
    say "host differs after down.sh: $f"; sed 's/^/  /' "$OUT/$f.diff" | head -40 >&2; diffs=$((diffs + 1))
  fi
done
check "host as before (iptables, ip6tables, links, addrs, sysctl -a, mounts, netns, cgroups, nfacct and nft tables,\
 paths)" '[ "$diffs" = 0 ]'
say "$failures failed check(s); logs in $OUT and $WORK/node/logs"
[ "$failures" = 0 ]
