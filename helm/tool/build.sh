#!/usr/bin/env bash
# Builds helm at the version pinned in go.mod (a tools module: no Go code of ours) into a cache
# outside the repository, keyed by that version, and reuses it when present. Prints the bin directory.
set -euo pipefail
cd "$(dirname "$0")"
version=$(awk '$1 == "helm.sh/helm/v3" {print $2}' go.mod)
cache=${STS_TOOL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/sts-tools}
bin="$cache/helm-$version/bin"
if [ -x "$bin/helm" ]; then
  echo "$bin"
  exit 0
fi
command -v go >/dev/null || { echo "building helm needs Go (https://go.dev/dl)" >&2; exit 2; }
echo "building helm $version into $bin" >&2
mkdir -p "$bin.partial"
CGO_ENABLED=0 GOTOOLCHAIN=local GOFLAGS=-mod=mod go build -trimpath -ldflags='-s -w' -o "$bin.partial/" \
  helm.sh/helm/v3/cmd/helm >&2
rm -rf "$bin"
mv "$bin.partial" "$bin"
echo "$bin"
