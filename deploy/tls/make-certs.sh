#!/usr/bin/env bash
# Make vigil's certificates with openssl: a cluster CA, the coordinator's server
# certificate, one per node, one per operator. Everything lands in DIR (default
# ./vigil-tls); keys are created 0600. Details and rotation: docs/security.md.
#
#   make-certs.sh ca                              the cluster CA (ca.crt, ca.key)
#   make-certs.sh coordinator NAME [SAN...]       server cert; SANs are DNS names or IPs
#                                                 agents and clusterctl dial (NAME is one)
#   make-certs.sh node NAME                       an agent's cert: CN=NAME, O=vigil:node
#   make-certs.sh admin USER | viewer USER        an operator's cert: O=vigil:admin|viewer
#
# Environment: VIGIL_TLS_DIR (default ./vigil-tls), VIGIL_TLS_DAYS (default 365;
# the CA gets 10 years), VIGIL_TLS_FILE (output name, default: NAME or USER).
set -euo pipefail

dir=${VIGIL_TLS_DIR:-./vigil-tls}
days=${VIGIL_TLS_DAYS:-365}
usage() { sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 64; }
die() { echo "make-certs.sh: $*" >&2; exit 1; }
command -v openssl >/dev/null || die "openssl not found: install it (apt-get install openssl)"
[ $# -ge 1 ] || usage
mkdir -p "$dir"
umask 077

# Names go into a certificate subject: keep them to what vigil accepts as node names.
check_name() {
  [[ $1 =~ ^[A-Za-z0-9._-]{1,63}$ ]] || die "name ${1@Q} must be 1-63 characters from [A-Za-z0-9._-]"
}

need_ca() {
  [ -f "$dir/ca.crt" ] && [ -f "$dir/ca.key" ] || die "no CA in $dir: run '$0 ca' first"
}

# issue FILE SUBJECT EXTENSIONS: a P-256 key and a certificate signed by the CA.
issue() {
  local file=$1 subject=$2 ext=$3
  [ -e "$dir/$file.key" ] && die "$dir/$file.key exists: remove it first to re-issue"
  openssl ecparam -name prime256v1 -genkey -noout -out "$dir/$file.key.ec" 2>/dev/null
  openssl pkcs8 -topk8 -nocrypt -in "$dir/$file.key.ec" -out "$dir/$file.key"
  rm -f "$dir/$file.key.ec"
  openssl req -new -key "$dir/$file.key" -subj "$subject" -out "$dir/$file.csr"
  printf '%b' "$ext" >"$dir/$file.ext"
  openssl x509 -req -in "$dir/$file.csr" -CA "$dir/ca.crt" -CAkey "$dir/ca.key" \
    -CAcreateserial -days "$days" -sha256 -extfile "$dir/$file.ext" -out "$dir/$file.crt" 2>/dev/null
  rm -f "$dir/$file.csr" "$dir/$file.ext"
  chmod 0644 "$dir/$file.crt"
  echo "wrote $dir/$file.crt and $dir/$file.key ($subject, $days days)"
}

case $1 in
  ca)
    [ -e "$dir/ca.key" ] && die "$dir/ca.key exists: a second CA would split the cluster"
    openssl ecparam -name prime256v1 -genkey -noout -out "$dir/ca.key.ec" 2>/dev/null
    openssl pkcs8 -topk8 -nocrypt -in "$dir/ca.key.ec" -out "$dir/ca.key"
    rm -f "$dir/ca.key.ec"
    openssl req -x509 -new -key "$dir/ca.key" -sha256 -days 3650 -subj "/CN=vigil cluster CA" \
      -addext "basicConstraints=critical,CA:TRUE" \
      -addext "keyUsage=critical,keyCertSign,cRLSign,digitalSignature" -out "$dir/ca.crt"
    chmod 0644 "$dir/ca.crt"
    echo "wrote $dir/ca.crt and $dir/ca.key: keep ca.key offline; it can mint any identity"
    ;;
  coordinator)
    [ $# -ge 2 ] || usage
    need_ca
    name=$2; shift 2
    sans="DNS:$name"
    for s in "$@"; do
      if [[ $s =~ ^[0-9.]+$ || $s == *:* ]]; then sans+=",IP:$s"; else sans+=",DNS:$s"; fi
    done
    issue "${VIGIL_TLS_FILE:-coordinator}" "/CN=$name" \
      "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\nsubjectAltName=$sans\n"
    ;;
  node)
    [ $# -eq 2 ] || usage
    need_ca; check_name "$2"
    issue "${VIGIL_TLS_FILE:-$2}" "/O=vigil:node/CN=$2" \
      "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=clientAuth\nsubjectAltName=DNS:$2\n"
    ;;
  admin | viewer)
    [ $# -eq 2 ] || usage
    need_ca; check_name "$2"
    issue "${VIGIL_TLS_FILE:-$2}" "/O=vigil:$1/CN=$2" \
      "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=clientAuth\n"
    ;;
  *) usage ;;
esac
