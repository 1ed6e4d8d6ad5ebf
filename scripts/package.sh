#!/usr/bin/env bash
# Builds the hvac-edge Debian package for a gateway target (docs/install.md "Debian package").
#
#   scripts/package.sh TARGET [--no-build]
#
# TARGET: aarch64-unknown-linux-gnu (arm64) | armv7-unknown-linux-gnueabihf (armhf) |
#         aarch64-unknown-linux-musl (arm64, static) | x86_64-unknown-linux-gnu (amd64)
#
# 1. scripts/cross-build.sh TARGET (profile gateway), unless --no-build;
# 2. installs cargo-deb (cargo install cargo-deb --locked) when missing;
# 3. writes the shipped config, target-cross/package/hvac-edge.toml: config/hvac-edge.toml with
#    gateway.id and sinks.http[0].url emptied, so that check-config (and therefore the
#    postinst) refuses it until the integrator has set both; checks that the built binary
#    refuses it for exactly those two keys;
# 4. cargo deb --no-build --no-strip --target TARGET --profile gateway (the musl build with
#    --variant musl: no library dependencies), into $CARGO_TARGET_DIR/debian/TARGET/;
# 5. checks that the package's libc6 dependency covers the newest GLIBC symbol version the
#    binary needs, and prints the .deb's path, dpkg-deb --info and --contents.
set -euo pipefail
. "$(dirname "$0")/cross-common.sh"

usage() { echo "usage: $0 TARGET [--no-build]   (TARGET: $TARGETS)" >&2; exit 2; }
[ $# -ge 1 ] || usage
TARGET="$1"; shift
BUILD=1
while [ $# -gt 0 ]; do
    case "$1" in
        --no-build) BUILD=0; shift ;;
        *) usage ;;
    esac
done
target_info "$TARGET" || usage
cd "$ROOT"
PROFILE=gateway

[ "$BUILD" -eq 1 ] && scripts/cross-build.sh "$TARGET" --profile "$PROFILE"
BIN="$(binary_path "$TARGET" "$PROFILE")"
[ -x "$BIN" ] || { echo "no binary at $BIN: run scripts/cross-build.sh $TARGET" >&2; exit 1; }

if ! cargo deb --version >/dev/null 2>&1; then
    echo "installing cargo-deb"
    # Its own build directory: never target/, and not mixed with the gateway builds.
    CARGO_TARGET_DIR="$ROOT/target-cross/cargo-install" timeout 1800 nice -n 10 cargo install cargo-deb --locked
fi
echo "using $(cargo deb --version)"

# ---------------------------------------------------------------- the shipped config
STAGE="$ROOT/target-cross/package"
mkdir -p "$STAGE"
CONF="$STAGE/hvac-edge.toml"
{
    cat <<'EOF'
# Installed by the hvac-edge Debian package as /etc/hvac-edge/hvac-edge.toml (a conffile: once
# you edit it, upgrades never overwrite it; dpkg asks, or keeps yours with --force-confold).
#
# gateway.id and sinks.http[0].url are EMPTY ON PURPOSE: `hvac-edge check-config` refuses this
# file until you set them (or remove the [[sinks.http]] table), and the service starts only once
# check-config accepts it, so a fresh install forwards nothing to anyone. Then:
#   sudo -u hvac-edge hvac-edge check-config -c /etc/hvac-edge/hvac-edge.toml
#   systemctl start hvac-edge
# The unmodified reference is /usr/share/doc/hvac-edge/hvac-edge.toml.reference.
#
EOF
    sed -e 's|^id = "gw-0042"$|# Set it: the package ships it empty (check-config refuses the file until it is set).\nid = ""|' \
        -e 's|^url = "https://ingest.example.com/v1/events"$|# Set it (https://…) or remove this sink: the package ships it empty.\nurl = ""|' \
        config/hvac-edge.toml
} >"$CONF"
for want in '^id = ""$' '^url = ""$'; do
    if [ "$(grep -c "$want" "$CONF")" -ne 1 ]; then
        echo "FAIL: config/hvac-edge.toml changed shape: no single line matching $want after the edit" >&2
        exit 1
    fi
done
RUN=()
if [ -n "$QEMU" ]; then
    apt_ensure qemu-user
    RUN=("$QEMU")
    [ -n "$SYSROOT" ] && RUN+=(-L "$SYSROOT")
fi
set +e
verdict="$(timeout 60 "${RUN[@]}" "$BIN" check-config -c "$CONF" 2>&1)"
rc=$?
set -e
if [ "$rc" -ne 78 ] || ! grep -q '(2 problems)' <<<"$verdict" \
    || ! grep -q '^  gateway.id: must not be empty' <<<"$verdict" \
    || ! grep -q '^  sinks.http\[0\].url: ' <<<"$verdict"; then
    echo "FAIL: the shipped config must be refused for gateway.id and sinks.http[0].url only; check-config exited $rc:" >&2
    echo "$verdict" >&2
    exit 1
fi
echo "shipped config: refused by check-config until edited (exit 78: gateway.id, sinks.http[0].url)"

# ---------------------------------------------------------------- the package
OUT="$CARGO_TARGET_DIR/debian/$TARGET"
rm -rf "$OUT"
mkdir -p "$OUT"
VARIANT=()
[ "$TARGET" = aarch64-unknown-linux-musl ] && VARIANT=(--variant musl)
timeout 600 cargo deb --no-build --no-strip --target "$TARGET" --profile "$PROFILE" "${VARIANT[@]}" -o "$OUT/"
DEB="$(ls "$OUT"/*.deb)"
[ "$(echo "$DEB" | wc -l)" -eq 1 ] || { echo "FAIL: expected one .deb in $OUT: $DEB" >&2; exit 1; }

arch="$(dpkg-deb -f "$DEB" Architecture)"
[ "$arch" = "$DEB_ARCH" ] || { echo "FAIL: $DEB is for $arch, want $DEB_ARCH" >&2; exit 1; }
depends="$(dpkg-deb -f "$DEB" Depends)"
if readelf -l "$BIN" | grep -q INTERP; then
    need="$(readelf -V --wide "$BIN" | grep -o 'GLIBC_[0-9.]*' | sed 's/GLIBC_//' | sort -u -V | tail -1)"
    have="$(sed -n 's/.*libc6 (>= \([0-9.]*\)).*/\1/p' <<<"$depends")"
    if [ -z "$have" ] || ! dpkg --compare-versions "$have" ge "$need"; then
        echo "FAIL: the binary needs GLIBC_$need, the package depends on '${depends}'" >&2
        exit 1
    fi
    echo "depends: $depends (binary needs GLIBC_$need)"
else
    [ -z "$depends" ] || { echo "FAIL: a static binary needs no Depends, got '$depends'" >&2; exit 1; }
    echo "depends: none (static binary)"
fi
echo "== dpkg-deb --info $DEB"
dpkg-deb --info "$DEB"
echo "== dpkg-deb --contents $DEB"
dpkg-deb --contents "$DEB"
echo "package: $DEB ($(stat -c %s "$DEB") bytes)"
