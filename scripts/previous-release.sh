#!/usr/bin/env bash
# Build the previous minor release's vigil-coordinator, vigil-agent and clusterctl, for the
# version-skew tests (tests/tests/compat.rs, docs/operations.md "Upgrades").
#
# The release is named in .ci/previous-release: its tag, and the commit the tag names (a clone
# without tags still has the commit). Its source is exported with `git archive` under
# target/previous-release/src and built there with its own target dir; the binaries land in
# target/previous-release/bin, whose path this script prints last. Run the tests with
#   VIGIL_PREVIOUS_RELEASE=target/previous-release/bin cargo test -p vigil-tests --test compat
# Measured on 2 cores: about 6 min for a clean debug build.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
read -r tag commit < <(grep -v '^#' .ci/previous-release | grep . | head -1)
if git rev-parse -q --verify "refs/tags/$tag^{commit}" >/dev/null; then
  rev=$(git rev-parse "refs/tags/$tag^{commit}")
  if [ "$rev" != "$commit" ]; then
    echo "previous-release: tag $tag names $rev, but .ci/previous-release says $commit: fix one" >&2
    exit 1
  fi
elif git cat-file -e "$commit^{commit}" 2>/dev/null; then
  rev=$commit
else
  echo "previous-release: neither tag $tag nor commit $commit is in this clone;" \
    "fetch the tags (git fetch --tags) or clone with full history" >&2
  exit 1
fi
out=$root/target/previous-release
src=$out/src
if [ "$(cat "$out/bin/REVISION" 2>/dev/null)" = "$rev" ] && [ -x "$out/bin/vigil-agent" ]; then
  echo "previous-release: $tag ($rev) already built" >&2
  echo "$out/bin"
  exit 0
fi
echo "previous-release: building $tag ($rev)" >&2
rm -rf "$src" "$out/bin"
mkdir -p "$src" "$out/bin"
git archive "$rev" | tar -x -C "$src"
(cd "$src" && cargo build --locked --quiet --bins -p vigil-coordinator -p vigil-agent -p clusterctl \
  --target-dir "$out/target")
for b in vigil-coordinator vigil-agent clusterctl; do
  cp "$out/target/debug/$b" "$out/bin/$b"
done
echo "$rev" >"$out/bin/REVISION"
echo "$tag" >"$out/bin/TAG"
"$out/bin/vigil-agent" --version >&2
echo "$out/bin"
