#!/usr/bin/env bash
# Builds spire-server and spire-agent at the version pinned in go.mod (a tools module: no Go code of
# ours) into a cache outside the repository, keyed by that version, and reuses it when present.
# Prints the bin directory. cgo is on: SPIRE's SQLite datastore needs it.
set -euo pipefail
cd "$(dirname "$0")"
version=$(awk '$1 == "github.com/spiffe/spire" {print $2}' go.mod)
cache=${STS_TOOL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/sts-tools}
bin="$cache/spire-$version/bin"
if [ -x "$bin/spire-server" ] && [ -x "$bin/spire-agent" ]; then
  echo "$bin"
  exit 0
fi
command -v go >/dev/null || { echo "building SPIRE needs Go (https://go.dev/dl)" >&2; exit 2; }
command -v gcc >/dev/null || { echo "building SPIRE needs gcc (cgo: SPIRE's SQLite datastore)" >&2; exit 2; }
echo "building SPIRE $version into $bin (a cold build takes 10-20 minutes on 2 cores)" >&2
mkdir -p "$bin.partial"
CGO_ENABLED=1 GOTOOLCHAIN=local GOFLAGS=-mod=mod go build -trimpath -ldflags='-s -w' -o "$bin.partial/" \
  github.com/spiffe/spire/cmd/spire-server github.com/spiffe/spire/cmd/spire-agent >&2
rm -rf "$bin"
mv "$bin.partial" "$bin"
echo "$bin"
