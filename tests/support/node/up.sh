#!/usr/bin/env bash
# up.sh: a real one-node Kubernetes cluster for tests/node.rs (started by tests/support/node.rs).
#
# The node lives in a network namespace of its own (nbop-node): containerd, kubelet, kube-proxy, the
# CNI bridge, the pods and every iptables rule they make. A veth pair joins it to the host:
#   host  nbop-h 10.250.0.1/30  etcd (loopback), kube-apiserver, kube-controller-manager,
#                               kube-scheduler, the tests' NetBird server
#   netns nbop-n 10.250.0.2/30  the node's address; pods 10.244.0.0/24, Services 10.96.0.0/24
# The namespace has no default route: nothing in it can reach an address off this machine. The
# host routes only the pod and Service ranges to the veth.
#
# Everything is recorded under $R for down.sh (sysctls, processes, cgroups), which undoes it all.
# Needs root. Inputs (environment): R, KUBE_BIN, ETCD_BIN, NODE_BIN, CONTAINERD_BIN, API_PORT,
# ETCD_PORT, KCM_PORT, SCHED_PORT, IMAGES (OCI archives to import, space-separated).
set -euo pipefail
: "${R:?}" "${KUBE_BIN:?}" "${ETCD_BIN:?}" "${NODE_BIN:?}" "${CONTAINERD_BIN:?}"
: "${API_PORT:?}" "${ETCD_PORT:?}" "${KCM_PORT:?}" "${SCHED_PORT:?}"
RUNC=$(command -v runc)
CNI_BIN=/usr/lib/cni
NS=nbop-node
NODE=nbop-node
HOST_IP=10.250.0.1
NODE_IP=10.250.0.2
POD_CIDR=10.244.0.0/24
SVC_CIDR=10.96.0.0/24
CG=nbop-node

t0=$(date +%s%N)
log() { printf '[node up %5dms] %s\n' "$(( ($(date +%s%N) - t0) / 1000000 ))" "$*"; }
die() { echo "[node up] FATAL: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "must run as root"
[ -e "$R/pids" ] && die "$R/pids exists; run down.sh first"
mkdir -p "$R"/{pids,logs,pki,etcd,kubelet,pod-logs,containerd/root,containerd/state,containerd/opt,cni/net.d,cni/ipam,cni/cache}
export KUBECONFIG=$R/admin.kubeconfig
kubectl() { "$KUBE_BIN/kubectl" "$@"; }
in_ns() { nsenter --net=/run/netns/$NS -- "$@"; }

start() { # name, command...: a session of its own, its pid recorded for down.sh
  local n=$1; shift
  setsid "$@" >"$R/logs/$n.log" 2>&1 </dev/null &
  echo $! >"$R/pids/$n.pid"
}
wait_for() { # description, timeout-seconds, command...
  local d=$1 to=$2; shift 2
  local end=$(( $(date +%s) + to ))
  until "$@" >/dev/null 2>&1; do
    if [ "$(date +%s)" -ge "$end" ]; then
      for f in "$R"/logs/*.log; do echo "--- $f (tail)"; tail -n 15 "$f"; done >&2
      die "timed out waiting for $d"
    fi
    sleep 0.2
  done
}

# --- host sysctls the kubelet changes (kernel.*, vm.*: not per network namespace) ------------------
for s in vm.overcommit_memory vm.panic_on_oom kernel.panic kernel.panic_on_oops kernel.keys.root_maxkeys \
         kernel.keys.root_maxbytes net.ipv4.ip_forward; do
  echo "$s=$(sysctl -n $s)"
done >"$R/sysctl.orig"
# directories outside $R that containerd's shims, libcni and the kubelet create: removed by down.sh
# only when they did not exist before
for d in /run/containerd /var/lib/cni /usr/libexec/kubernetes /var/lib/kubelet /etc/cni /opt/cni; do
  [ -e "$d" ] || echo "$d"
done >"$R/created-dirs"

# --- the network namespace and its veth --------------------------------------------------------------
ip netns add $NS
echo $NS >"$R/netns"
ip link add nbop-h type veth peer name nbop-n
ip link set nbop-n netns $NS
ip addr add $HOST_IP/30 dev nbop-h
ip link set nbop-h up
in_ns ip link set lo up
in_ns ip addr add $NODE_IP/30 dev nbop-n
in_ns ip link set nbop-n up
ip route add $POD_CIDR via $NODE_IP dev nbop-h
ip route add $SVC_CIDR via $NODE_IP dev nbop-h
# per namespace: forwarding between the veth and the pods' bridge, bridged traffic through iptables
in_ns sysctl -q -w net.ipv4.ip_forward=1
in_ns sysctl -q -w net.bridge.bridge-nf-call-iptables=1 2>/dev/null || true

# --- a cgroup root of its own under every v1 hierarchy (cgroupfs driver) -----------------------------
: >"$R/cgroups"
for c in /sys/fs/cgroup/*/; do
  [ "$c" = /sys/fs/cgroup/unified/ ] && continue
  [ -d "$c$CG" ] || { mkdir "$c$CG"; echo "$c$CG" >>"$R/cgroups"; }
done
cat /sys/fs/cgroup/cpuset/cpuset.cpus >/sys/fs/cgroup/cpuset/$CG/cpuset.cpus
cat /sys/fs/cgroup/cpuset/cpuset.mems >/sys/fs/cgroup/cpuset/$CG/cpuset.mems
log "network namespace $NS, veth and cgroups ready"

# --- PKI (EC P-256; the service account key RSA) -----------------------------------------------------
cd "$R/pki"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout ca.key -out ca.crt -days 2 -subj /CN=nbop-node-ca 2>/dev/null
cert() { # name, subject, [SANs]
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout "$1.key" -out "$1.csr" -subj "$2" 2>/dev/null
  # X.509 v3 with extensions: rustls (the tests' client) refuses v1 certificates
  if [ -n "${3:-}" ]; then
    printf 'basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=serverAuth,clientAuth\nsubjectAltName=%s\n' "$3" >"$1.ext"
  else
    printf 'basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=clientAuth\n' >"$1.ext"
  fi
  openssl x509 -req -in "$1.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -days 2 -out "$1.crt" -extfile "$1.ext" 2>/dev/null
}
cert apiserver /CN=kube-apiserver "IP:$HOST_IP,IP:10.96.0.1,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local"
cert admin "/O=system:masters/CN=nbop-node-admin"
cert apiserver-kubelet-client "/O=system:masters/CN=kube-apiserver-kubelet-client"
cert kubelet "/O=system:nodes/CN=system:node:$NODE"
cert kubelet-serving "/CN=$NODE" "IP:$NODE_IP"
cert kcm /CN=system:kube-controller-manager
cert scheduler /CN=system:kube-scheduler
cert kube-proxy /CN=system:kube-proxy
openssl genrsa -out sa.key 2048 2>/dev/null; openssl rsa -in sa.key -pubout -out sa.pub 2>/dev/null
kubeconfig() { # file, cert-name
  cat >"$1" <<EOF
apiVersion: v1
kind: Config
clusters: [{name: nbop-node, cluster: {server: "https://$HOST_IP:$API_PORT", certificate-authority: "$R/pki/ca.crt"}}]
users: [{name: u, user: {client-certificate: "$R/pki/$2.crt", client-key: "$R/pki/$2.key"}}]
contexts: [{name: nbop-node, context: {cluster: nbop-node, user: u}}]
current-context: nbop-node
EOF
}
for n in admin kubelet kcm scheduler kube-proxy; do kubeconfig "$R/$n.kubeconfig" $n; done
cd "$R"
log "pki ready"

# --- control plane (host namespace) ------------------------------------------------------------------
start etcd "$ETCD_BIN/etcd" --data-dir="$R/etcd" --listen-client-urls=http://127.0.0.1:$ETCD_PORT \
  --advertise-client-urls=http://127.0.0.1:$ETCD_PORT --listen-peer-urls=http://127.0.0.1:$((ETCD_PORT+1)) \
  --initial-advertise-peer-urls=http://127.0.0.1:$((ETCD_PORT+1)) --initial-cluster=default=http://127.0.0.1:$((ETCD_PORT+1)) \
  --unsafe-no-fsync --log-level=warn
start kube-apiserver "$KUBE_BIN/kube-apiserver" --etcd-servers=http://127.0.0.1:$ETCD_PORT \
  --bind-address=$HOST_IP --advertise-address=$HOST_IP --secure-port=$API_PORT \
  --tls-cert-file="$R/pki/apiserver.crt" --tls-private-key-file="$R/pki/apiserver.key" --client-ca-file="$R/pki/ca.crt" \
  --kubelet-client-certificate="$R/pki/apiserver-kubelet-client.crt" --kubelet-client-key="$R/pki/apiserver-kubelet-client.key" \
  --authorization-mode=Node,RBAC --enable-admission-plugins=NodeRestriction --allow-privileged=false \
  --kubelet-preferred-address-types=InternalIP \
  --service-cluster-ip-range=$SVC_CIDR --service-account-issuer=https://kubernetes.default.svc.cluster.local \
  --service-account-key-file="$R/pki/sa.pub" --service-account-signing-key-file="$R/pki/sa.key" \
  --cert-dir="$R/pki/apiserver-certs" --profiling=false --v=1
wait_for "kube-apiserver /readyz" 90 kubectl get --raw /readyz
log "kube-apiserver ready"
start kube-controller-manager "$KUBE_BIN/kube-controller-manager" --kubeconfig="$R/kcm.kubeconfig" \
  --authentication-kubeconfig="$R/kcm.kubeconfig" --authorization-kubeconfig="$R/kcm.kubeconfig" \
  --bind-address=127.0.0.1 --secure-port=$KCM_PORT --leader-elect=false \
  --service-account-private-key-file="$R/pki/sa.key" --root-ca-file="$R/pki/ca.crt" --use-service-account-credentials=true \
  --cluster-signing-cert-file="$R/pki/ca.crt" --cluster-signing-key-file="$R/pki/ca.key" \
  --service-cluster-ip-range=$SVC_CIDR --profiling=false --v=1
start kube-scheduler "$NODE_BIN/kube-scheduler" --kubeconfig="$R/scheduler.kubeconfig" \
  --authentication-kubeconfig="$R/scheduler.kubeconfig" --authorization-kubeconfig="$R/scheduler.kubeconfig" \
  --bind-address=127.0.0.1 --secure-port=$SCHED_PORT --leader-elect=false --profiling=false --v=1

# --- containerd 2.x (CRI), in the node's network namespace -------------------------------------------
C=$R/containerd
cat >"$C/config.toml" <<EOF
version = 3
root = "$C/root"
state = "$C/state"
imports = []
[grpc]
  address = "$C/containerd.sock"
[ttrpc]
  address = "$C/containerd.sock.ttrpc"
[debug]
  address = "$C/debug.sock"
[plugins]
  [plugins."io.containerd.internal.v1.opt"]
    path = "$C/opt"
  [plugins."io.containerd.nri.v1.nri"]
    disable = true
  [plugins."io.containerd.cri.v1.images"]
    snapshotter = "overlayfs"
    [plugins."io.containerd.cri.v1.images".pinned_images]
      sandbox = "nbop.local/pause:1"
  [plugins."io.containerd.cri.v1.runtime"]
    enable_selinux = false
    disable_apparmor = true
    netns_mounts_under_state_dir = true
    # root here may lack CAP_SYS_RESOURCE: a negative oom_score_adj (pause -998) makes runc fail
    # ("nsexec: failed to update /proc/self/oom_score_adj: Permission denied"); this clamps it
    restrict_oom_score_adj = true
    cdi_spec_dirs = []
    [plugins."io.containerd.cri.v1.runtime".containerd]
      default_runtime_name = "runc"
      [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc]
        runtime_type = "io.containerd.runc.v2"
        [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc.options]
          BinaryName = "$RUNC"
          Root = "$C/runc"
          SystemdCgroup = false
    [plugins."io.containerd.cri.v1.runtime".cni]
      bin_dirs = ["$CNI_BIN"]
      conf_dir = "$R/cni/net.d"
      max_conf_num = 1
  [plugins."io.containerd.grpc.v1.cri"]
    stream_server_address = "127.0.0.1"
    stream_server_port = "0"
EOF
cat >"$R/cni/net.d/10-nbop.conflist" <<EOF
{"cniVersion": "1.0.0", "name": "nbop",
 "plugins": [
  {"type": "bridge", "bridge": "nbop-br0", "isGateway": true, "ipMasq": false, "hairpinMode": true,
   "ipam": {"type": "host-local", "dataDir": "$R/cni/ipam", "ranges": [[{"subnet": "$POD_CIDR"}]],
            "routes": [{"dst": "0.0.0.0/0"}]}},
  {"type": "portmap", "capabilities": {"portMappings": true}}
 ]}
EOF
# the shim must find containerd-shim-runc-v2 on PATH
PATH=$CONTAINERD_BIN:$PATH start containerd nsenter --net=/run/netns/$NS -- "$CONTAINERD_BIN/containerd" \
  --config "$C/config.toml" --log-level warn
ctr() { "$CONTAINERD_BIN/ctr" --address "$C/containerd.sock" -n k8s.io "$@"; }
wait_for "containerd socket" 30 "$CONTAINERD_BIN/ctr" --address "$C/containerd.sock" version
log "containerd ready"
for img in ${IMAGES:-}; do
  ctr images import --platform linux/amd64 "$img" >"$R/logs/import.log" 2>&1 \
    || { cat "$R/logs/import.log" >&2; die "ctr images import $img failed"; }
done
log "images imported: $(ctr images ls -q | tr '\n' ' ')"

# --- kubelet and kube-proxy, in the node's network namespace -----------------------------------------
cat >"$R/kubelet/config.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
failCgroupV1: false
failSwapOn: false
cgroupDriver: cgroupfs
cgroupRoot: /$CG
containerRuntimeEndpoint: unix://$C/containerd.sock
address: $NODE_IP
port: 10250
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: 10248
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: "$R/pki/ca.crt"}
authorization: {mode: Webhook}
tlsCertFile: "$R/pki/kubelet-serving.crt"
tlsPrivateKeyFile: "$R/pki/kubelet-serving.key"
podLogsDir: "$R/pod-logs"
volumePluginDir: "$R/kubelet/volume-plugins"
resolvConf: ""
clusterDomain: cluster.local
maxPods: 30
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard: {memory.available: "100Mi", nodefs.available: "1%", imagefs.available: "1%", nodefs.inodesFree: "1%"}
serializeImagePulls: false
EOF
start kubelet nsenter --net=/run/netns/$NS -- "$NODE_BIN/kubelet" --config="$R/kubelet/config.yaml" \
  --kubeconfig="$R/kubelet.kubeconfig" --root-dir="$R/kubelet" --cert-dir="$R/kubelet/pki" \
  --hostname-override=$NODE --node-ip=$NODE_IP --v=1
cat >"$R/kube-proxy.yaml" <<EOF
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
mode: iptables
clientConnection: {kubeconfig: "$R/kube-proxy.kubeconfig"}
hostnameOverride: $NODE
bindAddress: $NODE_IP
healthzBindAddress: 127.0.0.1:10256
metricsBindAddress: 127.0.0.1:10249
clusterCIDR: $POD_CIDR
nodePortAddresses: ["$NODE_IP/32"]
conntrack: {maxPerCore: 0, min: 0, tcpEstablishedTimeout: 0s, tcpCloseWaitTimeout: 0s}
iptables: {localhostNodePorts: false}
EOF
start kube-proxy nsenter --net=/run/netns/$NS -- "$NODE_BIN/kube-proxy" --config="$R/kube-proxy.yaml" --v=1

wait_for "node $NODE to register" 120 kubectl get node $NODE
wait_for "node $NODE Ready" 180 kubectl wait --for=condition=Ready node/$NODE --timeout=2s
# the kubernetes Service's endpoints and the root CA ConfigMap every pod's token volume needs
wait_for "ConfigMap default/kube-root-ca.crt" 60 kubectl -n default get configmap kube-root-ca.crt
wait_for "ServiceAccount default/default" 60 kubectl -n default get serviceaccount default
log "node Ready"
