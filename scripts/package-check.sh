#!/usr/bin/env bash
# Check the Debian packages of scripts/package.sh on this host, as root: install both with
# dpkg -i, check what they put where (binaries, units, conffiles, man pages, completions), the
# accounts the units expect, the shipped configs (--check-config), the units (systemd-analyze
# verify, if installed; systemd need not run), a reinstall over themselves (the maintainer
# scripts are idempotent), then dpkg -r and dpkg --purge. Used by .ci/run; a throwaway machine
# is the place for it: it refuses to run where either package is installed already.
#
#   scripts/package-check.sh [COORDINATOR.deb AGENT.deb]    default: the newest under TARGET/debian/
#
# Needs dpkg and adduser (the packages depend on it); man-db's man(1) if installed.
set -euo pipefail
cd "$(dirname "$0")/.."

die() { echo "package-check.sh: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "run as root: it installs and removes packages"
for p in vigil-coordinator vigil-agent; do
  if dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null | grep -qv '^not-installed$'; then
    die "$p is installed on this host: this check would remove it"
  fi
done
if [ $# -eq 2 ]; then
  coordinator_deb=$1 agent_deb=$2
else
  [ $# -eq 0 ] || die "usage: $0 [COORDINATOR.deb AGENT.deb]"
  target=$(cargo metadata --format-version 1 --no-deps \
    | python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')
  coordinator_deb=$(ls -t "$target"/debian/vigil-coordinator_*.deb 2>/dev/null | head -1)
  agent_deb=$(ls -t "$target"/debian/vigil-agent_*.deb 2>/dev/null | head -1)
  [ -n "$coordinator_deb" ] && [ -n "$agent_deb" ] || die "no packages in $target/debian: run scripts/package.sh"
fi

check() { echo "  ok: $*"; }
fail() { echo "package-check.sh: FAILED: $*" >&2; exit 1; }
# Slim Debian images tell dpkg not to install man pages and docs (path-exclude in
# /etc/dpkg/dpkg.cfg.d/): there, such files are looked for in the packages instead.
excluded() {
  local dir
  for dir in /usr/share/man /usr/share/doc; do
    case $1 in "$dir"/*)
      grep -qs "^path-exclude=* *$dir/" /etc/dpkg/dpkg.cfg.d/* && return 0 ;;
    esac
  done
  return 1
}
exists() {
  local f
  for f in "$@"; do
    if excluded "$f"; then
      dpkg-deb -c "$coordinator_deb" "$agent_deb" 2>/dev/null | grep -q " \.$f\$" \
        || fail "$f is not in the packages"
    else
      [ -e "$f" ] || fail "$f is missing"
    fi
  done
  check "$# files present"
}
# The contents of an installed file, or of that file in the package when dpkg excludes it.
contents() {
  if excluded "$1"; then
    dpkg-deb --fsys-tarfile "$2" | tar -xO ".$1"
  else
    cat "$1"
  fi
}

echo "==> dpkg -i $coordinator_deb $agent_deb"
dpkg -i "$coordinator_deb" "$agent_deb"

echo "==> files"
exists /usr/bin/vigil-coordinator /usr/bin/clusterctl /usr/bin/vigil-agent \
  /usr/lib/systemd/system/vigil-coordinator.service /usr/lib/systemd/system/vigil-agent.service \
  /etc/vigil/coordinator.toml /etc/vigil/agent.toml /etc/vigil/tls \
  /usr/share/man/man1/vigil-coordinator.1.gz /usr/share/man/man1/clusterctl.1.gz \
  /usr/share/man/man1/vigil-agent.1.gz \
  /usr/share/bash-completion/completions/clusterctl /usr/share/zsh/vendor-completions/_clusterctl \
  /usr/share/fish/vendor_completions.d/clusterctl.fish \
  /usr/share/vigil-coordinator/make-certs.sh \
  /usr/share/doc/vigil-coordinator/examples/coordinator-ha.toml
for unit in vigil-coordinator vigil-agent; do
  grep -q "^ExecStart=/usr/bin/$unit --config /etc/vigil/" "/usr/lib/systemd/system/$unit.service" \
    || fail "$unit.service does not start /usr/bin/$unit"
  ! grep -q '^[^#]*/usr/local' "/usr/lib/systemd/system/$unit.service" || fail "$unit.service runs something in /usr/local"
done
check "the units run /usr/bin/..."
[ "$(dpkg-query -W -f='${Conffiles}' vigil-coordinator | awk '{print $1}')" = /etc/vigil/coordinator.toml ] \
  || fail "vigil-coordinator's conffiles: $(dpkg-query -W -f='${Conffiles}' vigil-coordinator)"
[ "$(dpkg-query -W -f='${Conffiles}' vigil-agent | awk '{print $1}')" = /etc/vigil/agent.toml ] \
  || fail "vigil-agent's conffiles: $(dpkg-query -W -f='${Conffiles}' vigil-agent)"
check "conffiles: /etc/vigil/coordinator.toml, /etc/vigil/agent.toml"

echo "==> accounts"
# The coordinator's unit: DynamicUser=yes (no account), SupplementaryGroups=vigil-tls.
getent group vigil-tls >/dev/null || fail "no group vigil-tls"
check "group vigil-tls ($(getent group vigil-tls))"
# The agent's unit runs as root; agent.toml's [workers] run_as = "vigil-job".
grep -q '^run_as = "vigil-job"' /etc/vigil/agent.toml || fail "agent.toml does not run jobs as vigil-job"
user=$(getent passwd vigil-job) || fail "no user vigil-job"
[ "$(echo "$user" | cut -d: -f3)" -lt 1000 ] || fail "vigil-job is not a system user: $user"
[ "$(echo "$user" | cut -d: -f7)" = /usr/sbin/nologin ] || fail "vigil-job can log in: $user"
check "system user vigil-job ($user)"

echo "==> the shipped configs"
/usr/bin/vigil-coordinator --check-config /etc/vigil/coordinator.toml
/usr/bin/vigil-agent --check-config /etc/vigil/agent.toml

echo "==> man pages"
for bin in vigil-coordinator vigil-agent clusterctl; do
  page=/usr/share/man/man1/$bin.1.gz
  deb=$coordinator_deb
  [ "$bin" = vigil-agent ] && deb=$agent_deb
  roff=$(contents "$page" "$deb" | zcat)
  grep -q "^\.TH $bin 1" <<<"$roff" || fail "$page: no .TH $bin 1"
  if command -v man >/dev/null; then
    text=$(LC_ALL=C MANWIDTH=80 man -l - <<<"$roff" 2>&1) || fail "man -l $page: $text"
    grep -q "^NAME" <<<"$text" || fail "man -l $page: no NAME section: $text"
    grep -Eq "^ *$bin +- " <<<"$text" || fail "man -l $page does not name $bin: $text"
    grep -q -- "--version" <<<"$text" || fail "man -l $page: no --version: $text"
    check "man -l $page: $(grep -Em1 "^ *$bin +- " <<<"$text" | sed -E 's/^ *//; s/ +/ /g')"
  else
    check "zcat $page (no man(1) here to render it)"
  fi
done

echo "==> completions"
/usr/bin/clusterctl completion bash | grep -q '^_clusterctl()' || fail "clusterctl completion bash"
bash -c 'source /usr/share/bash-completion/completions/clusterctl && complete -p clusterctl' \
  | grep -q '_clusterctl' || fail "the packaged bash completion does not register"
grep -q '^#compdef clusterctl' /usr/share/zsh/vendor-completions/_clusterctl || fail "zsh completion"
grep -q '^complete -c clusterctl' /usr/share/fish/vendor_completions.d/clusterctl.fish || fail "fish completion"
check "clusterctl completion bash; bash, zsh and fish scripts in place"

if command -v systemd-analyze >/dev/null; then
  echo "==> systemd-analyze verify (the packaged units)"
  out=$(systemd-analyze verify --recursive-errors=no \
    /usr/lib/systemd/system/vigil-coordinator.service /usr/lib/systemd/system/vigil-agent.service 2>&1) \
    || fail "$out"
  [ -z "$out" ] || fail "$out"
  check "systemd-analyze verify: no output"
fi

echo "==> reinstall over themselves (maintainer scripts run again)"
dpkg -i "$coordinator_deb" "$agent_deb"
[ "$(getent passwd vigil-job | wc -l)" = 1 ] && [ "$(getent group vigil-tls | wc -l)" = 1 ] \
  || fail "accounts after a reinstall"
check "reinstalled"

echo "==> dpkg -r"
dpkg -r vigil-coordinator vigil-agent
for f in /usr/bin/vigil-coordinator /usr/bin/clusterctl /usr/bin/vigil-agent \
  /usr/lib/systemd/system/vigil-coordinator.service /usr/share/man/man1/vigil-agent.1.gz; do
  [ ! -e "$f" ] || fail "$f is left after dpkg -r"
done
exists /etc/vigil/coordinator.toml /etc/vigil/agent.toml
check "binaries gone, configs kept"

echo "==> dpkg --purge"
dpkg --purge vigil-coordinator vigil-agent
for f in /etc/vigil/coordinator.toml /etc/vigil/agent.toml /etc/vigil/tls; do
  [ ! -e "$f" ] || fail "$f is left after dpkg --purge"
done
check "configs gone (the vigil-job user and vigil-tls group stay, as Debian does with accounts)"
echo "package-check.sh: ok"
