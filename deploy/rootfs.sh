#!/bin/sh
# Lays out the files of Tessera's image for a `tessera` binary, under OUT: rootfs/ with
# the binary at usr/local/bin/tessera and each shared library it loads (ldd's list, the
# loader included) at its own path, and data/, empty, for the data directory (copied in
# on its own so it belongs to the image's user). The Dockerfile's build stage and the
# image test (crates/cli/tests/image.rs) both make the runtime's files with this script.
#
#   deploy/rootfs.sh target/release/tessera /out
set -eu
bin=$1
out=$2/rootfs
mkdir -p "$out/usr/local/bin" "$2/data"
cp "$bin" "$out/usr/local/bin/tessera"
ldd "$bin" | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}' | while read -r lib; do
  mkdir -p "$out$(dirname "$lib")"
  cp -L "$lib" "$out$lib"
done
