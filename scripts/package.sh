#!/usr/bin/env bash
# Build the Debian packages vigil-coordinator (with clusterctl) and vigil-agent with cargo-deb
# (installed with `cargo install cargo-deb --locked` if missing). Their contents are in
# coordinator/Cargo.toml and agent/Cargo.toml ([package.metadata.deb]), the maintainer scripts
# in deploy/debian/; docs/quickstart-cluster.md installs them. scripts/package-check.sh checks
# them on this host.
#
#   scripts/package.sh       prints the two .deb paths (under TARGET/debian/) on its last lines;
#                            beside them, their debug symbols (-dbgsym_*.ddeb)
#
# Before cargo-deb runs, this writes into TARGET/release/pkg/ what the packages take from the
# built binaries:
#   - each binary's man page: `BINARY --print-man` (a hidden flag; clap_mangen renders the
#     command line the binary parses, so the page cannot drift from --help), gzipped;
#   - clusterctl's bash, zsh and fish completions (`clusterctl completion SHELL`);
#   - the systemd units of deploy/systemd/ with ExecStart and ExecReload in /usr/bin, where the
#     packages put the binaries (the units in deploy/ name /usr/local/bin, for a manual install).
# So build with this script, not `cargo deb` alone. Needs dpkg-shlibdeps (Debian's dpkg-dev)
# for the packages' library dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."

die() { echo "package.sh: $*" >&2; exit 1; }
command -v dpkg-shlibdeps >/dev/null || die "dpkg-shlibdeps not found: apt-get install dpkg-dev"
command -v gzip >/dev/null || die "gzip not found: apt-get install gzip"
if ! cargo deb --version >/dev/null 2>&1; then
  echo "==> cargo install cargo-deb --locked"
  cargo install cargo-deb --locked
fi

target=$(cargo metadata --format-version 1 --no-deps \
  | python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')
release=$target/release
pkg=$release/pkg

echo "==> cargo build --release (vigil-coordinator, vigil-agent, clusterctl)"
cargo build --release --bins -p vigil-coordinator -p vigil-agent -p clusterctl

echo "==> man pages, completions and units into $pkg"
rm -rf "$pkg"
mkdir -p "$pkg"
for bin in vigil-coordinator vigil-agent clusterctl; do
  "$release/$bin" --print-man >"$pkg/$bin.1"
  grep -q "^\.TH $bin 1" "$pkg/$bin.1" || die "$bin --print-man: no .TH line"
  gzip -9 -n "$pkg/$bin.1"
done
"$release/clusterctl" completion bash >"$pkg/clusterctl.bash"
"$release/clusterctl" completion zsh >"$pkg/_clusterctl"
"$release/clusterctl" completion fish >"$pkg/clusterctl.fish"
for unit in vigil-coordinator vigil-agent; do
  # The first comment line says how to install by hand; the package has done it.
  sed -E \
    -e "1s/ Install:\$/ Installed by the Debian package $unit (scripts\/package.sh)./" \
    -e '/^#   (install|systemctl) /d' \
    -e '/^Exec/s|/usr/local/bin/|/usr/bin/|g' \
    "deploy/systemd/$unit.service" >"$pkg/$unit.service"
  if grep -n '^[^#]*/usr/local' "$pkg/$unit.service" >&2; then
    die "$pkg/$unit.service still runs something in /usr/local"
  fi
done

echo "==> cargo deb"
mkdir -p "$target/debian"
debs=()
for crate in vigil-coordinator vigil-agent; do
  # --no-build: the binaries above; cargo-deb would not build clusterctl (another crate).
  # --dbgsym: the binaries are stripped; their debug info (the release profile keeps line tables,
  # for backtraces) goes to CRATE-dbgsym_*.ddeb beside the package, as Debian's own packages do.
  deb=$(cargo deb --no-build --dbgsym -p "$crate" --output "$target/debian/" | grep '\.deb$' | tail -1)
  [ -f "$deb" ] || die "cargo deb -p $crate wrote no package"
  debs+=("$deb")
done
for deb in "${debs[@]}"; do
  dpkg-deb --info "$deb" | sed -n 's/^ \(Package\|Version\|Depends\|Installed-Size\):/  \1:/p'
done
printf '%s\n' "${debs[@]}"
