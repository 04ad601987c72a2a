#!/usr/bin/env bash
# Fetches the Keycloak distribution pinned in pom.xml from Maven Central (Maven's own
# dependency:copy) into a cache outside the repository, keyed by version, unpacks it and runs its
# one-time `kc.sh build` with the features and database the bench starts it with (what a production
# user does before `kc.sh start --optimized`). Reuses the cache when present. Prints the home directory.
set -euo pipefail
cd "$(dirname "$0")"
version=$(sed -n 's:.*<keycloak.version>\(.*\)</keycloak.version>.*:\1:p' pom.xml)
cache=${STS_TOOL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/sts-tools}
home="$cache/keycloak-$version"
build_options=(--db=dev-file --features=spiffe,client-auth-federated,token-exchange-standard:v2 --http-relative-path=/)
if [ -x "$home/bin/kc.sh" ] && [ -f "$home/.sts-built" ] && [ "$(cat "$home/.sts-built")" = "${build_options[*]}" ]; then
  echo "$home"
  exit 0
fi
command -v mvn >/dev/null || { echo "fetching Keycloak needs Maven (mvn)" >&2; exit 2; }
command -v java >/dev/null || { echo "running Keycloak needs Java 17 or newer" >&2; exit 2; }
echo "fetching Keycloak $version into $home" >&2
partial="$home.partial"
rm -rf "$partial"
mkdir -p "$partial"
mvn -q -B -f pom.xml dependency:copy -DoutputDirectory="$partial" >&2
(cd "$partial" && unzip -q "keycloak-quarkus-dist-$version.zip" && rm "keycloak-quarkus-dist-$version.zip")
rm -rf "$home"
mv "$partial/keycloak-$version" "$home"
rmdir "$partial"
echo "building Keycloak ($home/bin/kc.sh build ${build_options[*]})" >&2
"$home/bin/kc.sh" build "${build_options[@]}" >&2
echo "${build_options[*]}" > "$home/.sts-built"
echo "$home"
