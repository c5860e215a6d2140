#!/usr/bin/env bash
# image.sh BINARY REF OUT.tar: the operator's OCI image archive, built without a container engine
# and without pulling anything: the Dockerfile's final stage on a distroless/cc-debian12 layout made
# from this Debian 12 machine's files (the glibc libraries the binary links, CA certificates,
# /etc/passwd and /etc/group with nonroot 65532, /tmp, /home/nonroot), the binary at
# /usr/local/bin/netbird-operator, and the final stage's entrypoint, command, user and port.
# tests/node.rs compares this image's config with the Dockerfile and fails when they disagree.
#
# pause mode: image.sh --pause PAUSE_BINARY REF OUT.tar (the CRI sandbox image: one static program)
set -euo pipefail
mode=operator
[ "${1:-}" = --pause ] && { mode=pause; shift; }
bin=$1 ref=$2 out=$3
w=$(mktemp -d); trap 'rm -rf "$w"' EXIT
root=$w/root
mkdir -p "$root" "$w/oci/blobs/sha256"

if [ $mode = pause ]; then
  install -m 0755 "$bin" "$root/pause"
  config='{"Entrypoint":["/pause"],"User":"65535:65535","WorkingDir":"/"}'
else
  # distroless/cc-debian12:nonroot: base-files, netbase, tzdata, ca-certificates, libc6, libgcc-s1,
  # libssl3, libgomp1, libstdc++6; here: what the binary needs of it (ldd), at Debian 12's paths
  mkdir -p "$root/usr/local/bin" "$root/etc/ssl/certs" "$root/tmp" "$root/home/nonroot" "$root/root" \
    "$root/var/lib" "$root/lib64"
  install -m 0755 "$bin" "$root/usr/local/bin/netbird-operator"
  ldd "$bin" | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}' | sort -u | while read -r lib; do
    mkdir -p "$root$(dirname "$lib")"
    cp -L "$lib" "$root$lib"
  done
  [ -f "$root/lib64/ld-linux-x86-64.so.2" ] || { echo "image.sh: the dynamic loader is missing (ldd $bin)" >&2; exit 1; }
  cp -L /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/ca-certificates.crt"
  cp -L /etc/os-release "$root/etc/os-release"
  cat >"$root/etc/passwd" <<'P'
root:x:0:0:root:/root:/sbin/nologin
nobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin
nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin
P
  cat >"$root/etc/group" <<'G'
root:x:0:
nobody:x:65534:
tty:x:5:
staff:x:50:
nonroot:x:65532:
G
  echo 'hosts: files dns' >"$root/etc/nsswitch.conf"
  chmod 0700 "$root/root"
  chmod 0700 "$root/home/nonroot"; chown 65532:65532 "$root/home/nonroot"
  # from the Dockerfile's final stage (tests/node.rs checks these against it)
  config='{"Entrypoint":["/usr/local/bin/netbird-operator"],"Cmd":["run"],"User":"65532:65532","ExposedPorts":{"8080/tcp":{}},"Env":["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin","SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt"],"WorkingDir":"/home/nonroot"}'
fi
chmod 1777 "$root/tmp" 2>/dev/null || true
(cd "$root" && tar --numeric-owner --mtime=@0 --sort=name -cf "$w/layer.tar" .)
blob() { local d; d=$(sha256sum "$1" | cut -d' ' -f1); cp "$1" "$w/oci/blobs/sha256/$d"; echo "$d $(stat -c %s "$1")"; }
read -r ld ls < <(blob "$w/layer.tar")
printf '{"architecture":"amd64","os":"linux","config":%s,"rootfs":{"type":"layers","diff_ids":["sha256:%s"]},"history":[{"created_by":"tests/support/node/image.sh"}]}' "$config" "$ld" >"$w/config.json"
read -r cd cs < <(blob "$w/config.json")
printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:%s","size":%s},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"sha256:%s","size":%s}]}' "$cd" "$cs" "$ld" "$ls" >"$w/manifest.json"
read -r md ms < <(blob "$w/manifest.json")
printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:%s","size":%s,"annotations":{"io.containerd.image.name":"%s","org.opencontainers.image.ref.name":"%s"}}]}' "$md" "$ms" "$ref" "${ref##*:}" >"$w/oci/index.json"
echo '{"imageLayoutVersion":"1.0.0"}' >"$w/oci/oci-layout"
# the config beside the archive, for the test that compares it with the Dockerfile
cp "$w/config.json" "$out.config.json"
tar --numeric-owner -C "$w/oci" -cf "$out" oci-layout index.json blobs
echo "image $ref -> $out (manifest sha256:$md, layer $((ls / 1024)) KiB)"
