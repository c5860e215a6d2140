#!/usr/bin/env bash
# down.sh: undoes up.sh, even a partial one, and is safe to run twice. Stops only processes up.sh
# started (their pid files, checked against their command line) and whatever runs in the node's
# network namespace or its cgroups; unmounts what lives under $R; deletes the network namespace
# (its links, routes and iptables rules go with it) and the host end of the veth; removes the
# cgroups; restores the sysctls; removes $R.
set -uo pipefail
: "${R:?}"
NS=nbop-node
CG=nbop-node
say() { echo "[node down] $*"; }
[ -d "$R" ] || { say "nothing to do ($R missing)"; exit 0; }

# a pid recorded by up.sh, if that process still runs and is ours ($R in its command line)
ours() {
  local p; p=$(cat "$R/pids/$1.pid" 2>/dev/null) || return 1
  tr '\0' ' ' <"/proc/$p/cmdline" 2>/dev/null | grep -qF -- "$R" || return 1
  echo "$p"
}
stop() { # name, seconds before SIGKILL
  local p; p=$(ours "$1") || return 0
  kill -TERM "$p" 2>/dev/null
  for _ in $(seq 1 $(( ${2:-5} * 10 ))); do kill -0 "$p" 2>/dev/null || return 0; sleep 0.1; done
  kill -KILL "$p" 2>/dev/null; say "killed $1 ($p)"
}
# every process of the pods: the pids in our cgroups (pids hierarchy, else any)
cgroup_pids() {
  local h
  for h in /sys/fs/cgroup/pids /sys/fs/cgroup/memory /sys/fs/cgroup/cpu; do
    [ -d "$h/$CG" ] && { find "$h/$CG" -name cgroup.procs -exec cat {} + 2>/dev/null; return; }
  done
}

# 1. the kubelet first (it would restart containers), then the pods' processes, then the rest of the
#    node: containerd, kube-proxy, the shims (everything left in the network namespace)
stop kubelet 5
for _ in 1 2 3 4 5 6 7 8 9 10; do
  pids=$(cgroup_pids); [ -z "$pids" ] && break
  kill -KILL $pids 2>/dev/null; sleep 0.2
done
stop kube-proxy 3
stop containerd 5
if [ -e "/run/netns/$NS" ]; then
  for _ in 1 2 3 4 5; do
    pids=$(ip netns pids $NS 2>/dev/null); [ -z "$pids" ] && break
    kill -KILL $pids 2>/dev/null; sleep 0.2
  done
fi
stop kube-scheduler 3
stop kube-controller-manager 3
stop kube-apiserver 5
stop etcd 3

# 2. mounts under $R, deepest first (overlay root filesystems, pod network namespaces, token volumes)
for _ in 1 2 3; do
  ms=$(awk -v r="$R/" 'index($5, r) == 1 {print $5}' /proc/self/mountinfo | sort -r)
  [ -z "$ms" ] && break
  for m in $ms; do umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null; done
done

# 3. the network namespace (its bridge, veths, routes and iptables rules) and the host's veth end
if [ -e "/run/netns/$NS" ]; then ip netns del $NS && say "deleted network namespace $NS"; fi
ip link del nbop-h 2>/dev/null && say "deleted nbop-h"

# 4. cgroups, deepest first
for c in /sys/fs/cgroup/*/$CG; do
  [ -d "$c" ] || continue
  find "$c" -depth -type d -exec rmdir {} \; 2>/dev/null
  [ -d "$c" ] && say "WARNING: could not remove $c"
done

# 5. sysctls
if [ -f "$R/sysctl.orig" ]; then
  while IFS== read -r k v; do
    [ "$(sysctl -n "$k" 2>/dev/null)" = "$v" ] || { sysctl -q -w "$k=$v" >/dev/null && say "restored $k=$v"; }
  done <"$R/sysctl.orig"
fi

# 6. what was created outside $R (libcni's cached results of our network, the shims' sockets dir)
rm -f /var/lib/cni/results/nbop-* 2>/dev/null
if [ -f "$R/created-dirs" ]; then
  while read -r d; do [ -e "$d" ] && rm -rf "$d" && say "removed $d"; done <"$R/created-dirs"
fi

# 7. the state
if [ "${KEEP_RUN:-0}" = 1 ]; then
  rm -rf "$R/pids"; say "kept $R (KEEP_RUN=1)"
else
  rm -rf "$R" && say "removed $R"
fi
true
