#!/usr/bin/env bash
# Builds hvac-edge for a gateway target without Docker (docs/install.md "Cross-building").
#
#   scripts/cross-build.sh TARGET [--profile P]
#
# TARGET: aarch64-unknown-linux-gnu | armv7-unknown-linux-gnueabihf |
#         aarch64-unknown-linux-musl (static) | x86_64-unknown-linux-gnu
# P: a Cargo profile, default `gateway` (size-tuned, stripped; Cargo.toml).
#
# Installs what is missing: the GNU cross gcc and libc of the target (apt-get), for musl also
# the arm64 dpkg architecture and musl-dev:arm64 (headers for scripts/aarch64-linux-musl-gcc),
# and the Rust target (rustup). Linkers and C compilers per target are in .cargo/config.toml.
# Builds into $CARGO_TARGET_DIR (default target-cross/, never target/), at nice 10, and prints
# the binary's path, its stripped size and the build time; for glibc targets also the newest
# GLIBC symbol version it needs (the package's libc6 dependency must cover it).
set -euo pipefail
. "$(dirname "$0")/cross-common.sh"

usage() { echo "usage: $0 TARGET [--profile P]   (TARGET: $TARGETS)" >&2; exit 2; }
[ $# -ge 1 ] || usage
TARGET="$1"; shift
PROFILE=gateway
while [ $# -gt 0 ]; do
    case "$1" in
        --profile) [ $# -ge 2 ] || usage; PROFILE="$2"; shift 2 ;;
        --profile=*) PROFILE="${1#--profile=}"; shift ;;
        *) usage ;;
    esac
done
target_info "$TARGET" || usage
cd "$ROOT"

# ---------------------------------------------------------------- toolchain
[ "$TARGET" = aarch64-unknown-linux-musl ] && dpkg_arch_ensure arm64
# shellcheck disable=SC2086 # APT_PKGS is a list
apt_ensure $APT_PKGS binutils
if ! rustup target list --installed | grep -qx "$TARGET"; then
    echo "rustup target add $TARGET"
    timeout 600 rustup target add "$TARGET"
fi

# ---------------------------------------------------------------- build
echo "building hvac-edge for $TARGET, profile $PROFILE, into $CARGO_TARGET_DIR"
start=$(date +%s)
timeout 3600 nice -n 10 cargo build --locked --bin hvac-edge --target "$TARGET" --profile "$PROFILE"
secs=$(( $(date +%s) - start ))

BIN="$(binary_path "$TARGET" "$PROFILE")"
[ -x "$BIN" ] || { echo "FAIL: no binary at $BIN" >&2; exit 1; }
# The gateway profile strips (strip = true); any other profile is stripped here, in place.
if readelf -S "$BIN" | grep -q '\.symtab'; then
    echo "stripping $BIN (profile $PROFILE does not strip)"
    "${GCC_PREFIX}strip" "$BIN"
fi

bytes=$(stat -c %s "$BIN")
mib=$(awk -v b="$bytes" 'BEGIN { printf "%.2f", b / 1048576 }')
linkage="dynamic (glibc)"
if ! readelf -l "$BIN" | grep -q 'INTERP'; then linkage="static"; fi
echo "target:     $TARGET ($DEB_ARCH), profile $PROFILE, $linkage"
echo "binary:     $BIN"
echo "stripped:   $bytes bytes ($mib MiB)"
if [ "$linkage" != static ]; then
    glibc=$(readelf -V --wide "$BIN" | grep -o 'GLIBC_[0-9.]*' | sed 's/GLIBC_//' | sort -u -V | tail -1)
    echo "needs:      GLIBC_$glibc ($(readelf -d "$BIN" | grep -o 'NEEDED.*\[.*\]' | sed 's/.*\[\(.*\)\]/\1/' | tr '\n' ' '))"
fi
echo "build time: ${secs} s"
