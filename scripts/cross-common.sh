# shellcheck shell=bash disable=SC2034  # the variables are used by the scripts that source this
# Shared by scripts/cross-build.sh, cross-smoke.sh and package.sh (sourced, not run).
# Target table, the build directory, and installing missing Debian packages.

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# Cross builds never share the default target/ directory (a native `cargo test` may be using it).
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target-cross}"
# Debian installs some tools (mosquitto, useradd) in /usr/sbin, which is not on every PATH.
export PATH="$PATH:/usr/sbin:$HOME/.cargo/bin"

SUDO=""
[ "$(id -u)" -ne 0 ] && SUDO="sudo"

TARGETS="aarch64-unknown-linux-gnu armv7-unknown-linux-gnueabihf aarch64-unknown-linux-musl x86_64-unknown-linux-gnu"

# Sets, for $1: GCC_PREFIX (binutils/gcc prefix, empty for the host), QEMU (emulator, empty for
# the host), SYSROOT (qemu -L, empty when static or native), DEB_ARCH, APT_PKGS (cross tools).
target_info() {
    case "$1" in
        aarch64-unknown-linux-gnu)
            GCC_PREFIX=aarch64-linux-gnu-; QEMU=qemu-aarch64; SYSROOT=/usr/aarch64-linux-gnu
            DEB_ARCH=arm64; APT_PKGS="gcc-aarch64-linux-gnu libc6-dev-arm64-cross" ;;
        armv7-unknown-linux-gnueabihf)
            GCC_PREFIX=arm-linux-gnueabihf-; QEMU=qemu-arm; SYSROOT=/usr/arm-linux-gnueabihf
            DEB_ARCH=armhf; APT_PKGS="gcc-arm-linux-gnueabihf libc6-dev-armhf-cross" ;;
        aarch64-unknown-linux-musl)
            # Static: no sysroot at run time. The C code is compiled against musl-dev:arm64's
            # headers by scripts/aarch64-linux-musl-gcc (see .cargo/config.toml).
            GCC_PREFIX=aarch64-linux-gnu-; QEMU=qemu-aarch64; SYSROOT=""
            DEB_ARCH=arm64; APT_PKGS="gcc-aarch64-linux-gnu musl-dev:arm64" ;;
        x86_64-unknown-linux-gnu)
            GCC_PREFIX=""; QEMU=""; SYSROOT=""
            DEB_ARCH=amd64; APT_PKGS="gcc libc6-dev" ;;
        *)
            echo "unsupported target: $1 (one of: $TARGETS)" >&2
            return 2 ;;
    esac
}

# Profile name -> the directory cargo writes it to.
profile_dir() {
    case "$1" in
        dev) echo debug ;;
        *) echo "$1" ;;
    esac
}

_apt_updated=""
# Installs the given Debian packages (name or name:arch) that are not installed yet.
apt_ensure() {
    local missing=() p
    for p in "$@"; do
        dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    echo "installing: ${missing[*]}"
    if [ -z "$_apt_updated" ]; then
        timeout 600 $SUDO apt-get update -qq
        _apt_updated=1
    fi
    DEBIAN_FRONTEND=noninteractive timeout 1200 $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# Adds a foreign dpkg architecture (musl-dev:arm64 needs arm64) if it is not there yet.
dpkg_arch_ensure() {
    if [ "$1" != "$(dpkg --print-architecture)" ] && ! dpkg --print-foreign-architectures | grep -qx "$1"; then
        echo "adding dpkg architecture $1"
        $SUDO dpkg --add-architecture "$1"
        _apt_updated=""
    fi
}

# The binary cargo builds for target $1 and profile $2.
binary_path() {
    echo "$CARGO_TARGET_DIR/$1/$(profile_dir "$2")/hvac-edge"
}
