#!/bin/sh
# install-signing-keys.sh SECRET_DIR KEYS_DIR
#
# Run by the chart's init container. Copies the signing keys of the mounted Kubernetes Secret into
# the layout the STS reads (KEYS_DIR/<class>/<created>-<class>-<thumbprint>.pem), each file owned by
# the STS user with mode 0400.
#
# Why a copy: the STS refuses a key that group or others can read, and the kubelet makes every file
# of a Secret volume group-readable (mode | 0440) as soon as the pod has an fsGroup; without an
# fsGroup the files belong to root and the non-root STS cannot read them at all. The copy lands in
# a memory-backed emptyDir that the STS container mounts read-only, so it never creates keys itself.
#
# The Secret's keys are the file names `sts keys create` writes: <created>-<class>-<thumbprint>.pem.
set -eu

src=${1:?usage: install-signing-keys.sh SECRET_DIR KEYS_DIR}
dst=${2:?usage: install-signing-keys.sh SECRET_DIR KEYS_DIR}
umask 077

count=0
for path in "$src"/*.pem; do
  [ -e "$path" ] || continue
  name=${path##*/}
  rest=${name#*-}          # <class>-<thumbprint>.pem
  class=${rest%%-*}
  case "$name" in
    [0-9]*-tool-*.pem | [0-9]*-data-*.pem) ;;
    *)
      echo "install-signing-keys: $name is not named <created>-<tool|data>-<thumbprint>.pem (as 'sts keys create' names keys)" >&2
      exit 1
      ;;
  esac
  mkdir -p "$dst/$class"
  chmod 0700 "$dst/$class"
  cp "$path" "$dst/$class/$name.tmp"
  chmod 0400 "$dst/$class/$name.tmp"
  mv -f "$dst/$class/$name.tmp" "$dst/$class/$name"
  count=$((count + 1))
done

for class in tool data; do
  if ! ls "$dst/$class/"*.pem > /dev/null 2>&1; then
    echo "install-signing-keys: the Secret holds no $class key; create keys with 'sts keys create --config FILE'" >&2
    exit 1
  fi
done
echo "install-signing-keys: installed $count signing keys"
