#!/usr/bin/env bash
# Installs, exercises, removes and purges an hvac-edge .deb on THIS machine, and checks that the
# machine is as clean afterwards as before (docs/install.md "Debian package").
#
#   scripts/deb-roundtrip.sh PATH/TO/hvac-edge_*_<this machine's arch>.deb
#
# For a build machine, container or VM: it needs root, and refuses to run when hvac-edge is
# already installed or a user hvac-edge exists. Steps, each PASS or FAIL:
#   dpkg -i; the shipped config is refused by check-config (exit 78: gateway.id, upstream URL);
#   the user hvac-edge is in dialout; owners and modes of /etc/hvac-edge, its secrets/ and the
#   config, and /var/lib/hvac-edge; with the config edited, check-config passes as hvac-edge and
#   the daemon, run as hvac-edge for 5 s, creates its database (0600) and exits 0 on SIGTERM;
#   dpkg -i again (the upgrade path) keeps the edited config; dpkg -r keeps the database, config
#   and user; dpkg -P removes them, the user and the group; passwd/group/shadow/gshadow and the
#   systemd directories are as before, and no hvac-edge file is left.
# Without systemd as PID 1 (as here) the service is enabled, never started.
set -uo pipefail
export PATH="$PATH:/usr/sbin:/sbin"

[ $# -eq 1 ] && [ -f "$1" ] || { echo "usage: $0 PATH/TO/hvac-edge.deb" >&2; exit 2; }
DEB="$(readlink -f "$1")"
[ "$(id -u)" -eq 0 ] || { echo "$0: needs root (it installs and purges the package)" >&2; exit 2; }
if dpkg-query -W hvac-edge >/dev/null 2>&1 || getent passwd hvac-edge >/dev/null || [ -e /var/lib/hvac-edge ] || [ -e /etc/hvac-edge ]; then
    echo "$0: hvac-edge (package, user, /etc/hvac-edge or /var/lib/hvac-edge) is already here; refusing" >&2
    exit 2
fi
CONFIG=/etc/hvac-edge/hvac-edge.toml
TMP="$(mktemp -d /tmp/hvac-edge-deb.XXXXXX)"
trap 'rm -rf "$TMP"' EXIT

passed=0; failed=0; failures=()
pass() { echo "PASS $1"; passed=$((passed + 1)); }
fail() {
    local name="$1"; shift
    echo "FAIL $name"
    for f in "$@"; do [ -f "$f" ] && sed 's/^/     | /' "$f" | tail -n 20; done
    failed=$((failed + 1)); failures+=("$name")
}
# check NAME COMMAND...: PASS when the command succeeds.
check() { local name="$1"; shift; if "$@" >"$TMP/out" 2>&1; then pass "$name"; else fail "$name" "$TMP/out"; fi; }
mode_is() { [ "$(stat -c '%a %U:%G' "$2")" = "$1" ]; }
snapshot() {
    for f in passwd group shadow gshadow; do cat "/etc/$f"; done
    find /etc/systemd /var/lib/systemd 2>/dev/null | sort
}

echo "deb-roundtrip: $DEB ($(dpkg-deb -f "$DEB" Package) $(dpkg-deb -f "$DEB" Version) $(dpkg-deb -f "$DEB" Architecture)); PID 1: $(ps -p 1 -o comm=)"
snapshot >"$TMP/before"

if timeout 300 dpkg -i "$DEB" >"$TMP/install" 2>&1; then
    pass "dpkg -i"; sed 's/^/     | /' "$TMP/install"
else
    fail "dpkg -i" "$TMP/install"
fi

timeout 30 hvac-edge check-config -c "$CONFIG" >"$TMP/check" 2>&1
rc=$?
if [ "$rc" -eq 78 ] && grep -q '(2 problems)' "$TMP/check" && grep -q 'gateway.id: must not be empty' "$TMP/check" \
    && grep -q 'sinks.http\[0\].url' "$TMP/check"; then
    pass "check-config refuses the shipped $CONFIG (exit 78: gateway.id, sinks.http[0].url)"
else
    fail "check-config on the shipped config: exit $rc, want 78" "$TMP/check"
fi
check "id hvac-edge: $(id hvac-edge 2>&1)" sh -c 'id -nG hvac-edge | tr " " "\n" | grep -qx dialout'
check "getent passwd: $(getent passwd hvac-edge)" sh -c 'getent passwd hvac-edge | grep -q ":/var/lib/hvac-edge:/usr/sbin/nologin$"'
check "/etc/hvac-edge 750 root:hvac-edge" mode_is "750 root:hvac-edge" /etc/hvac-edge
check "/etc/hvac-edge/secrets 750 root:hvac-edge" mode_is "750 root:hvac-edge" /etc/hvac-edge/secrets
check "$CONFIG 640 root:hvac-edge (conffile)" sh -c "mode_is() { [ \"\$(stat -c '%a %U:%G' \"\$2\")\" = \"\$1\" ]; }; mode_is '640 root:hvac-edge' $CONFIG && dpkg-query -W -f='\${Conffiles}' hvac-edge | grep -q ' $CONFIG '"
check "/var/lib/hvac-edge 750 hvac-edge:hvac-edge" mode_is "750 hvac-edge:hvac-edge" /var/lib/hvac-edge
check "unit enabled (multi-user.target.wants)" test -L /etc/systemd/system/multi-user.target.wants/hvac-edge.service

# An integrator's edit: the two emptied keys set.
sed -i 's|^id = ""$|id = "gw-roundtrip"|; s|^url = ""$|url = "https://ingest.invalid/v1/events"|' "$CONFIG"
check "check-config as hvac-edge after the edit: $(runuser -u hvac-edge -- hvac-edge check-config -c "$CONFIG" 2>&1 | head -1)" \
    runuser -u hvac-edge -- hvac-edge check-config -c "$CONFIG"
timeout --preserve-status -s TERM 5 setpriv --reuid hvac-edge --regid hvac-edge --init-groups \
    hvac-edge run -c "$CONFIG" >"$TMP/daemon" 2>&1
rc=$?
if [ "$rc" -eq 0 ] && mode_is "600 hvac-edge:hvac-edge" /var/lib/hvac-edge/hvac-edge.db; then
    pass "daemon as hvac-edge: created /var/lib/hvac-edge/hvac-edge.db (600), SIGTERM after 5 s -> exit 0"
else
    fail "daemon as hvac-edge: exit $rc" "$TMP/daemon"
fi
sum_before="$(md5sum <"$CONFIG")"

if timeout 300 dpkg -i "$DEB" >"$TMP/reinstall" 2>&1 && [ "$(md5sum <"$CONFIG")" = "$sum_before" ]; then
    pass "dpkg -i again (upgrade path): the edited config is kept"; sed 's/^/     | /' "$TMP/reinstall"
else
    fail "dpkg -i again" "$TMP/reinstall"
fi

if timeout 300 dpkg -r hvac-edge >"$TMP/remove" 2>&1; then pass "dpkg -r"; else fail "dpkg -r" "$TMP/remove"; fi
check "after -r: /usr/bin/hvac-edge and the unit are gone" sh -c '! [ -e /usr/bin/hvac-edge ] && ! [ -e /lib/systemd/system/hvac-edge.service ]'
check "after -r: database, config and user stay ($(ls /var/lib/hvac-edge 2>&1 | tr '\n' ' '))" \
    sh -c "[ -f /var/lib/hvac-edge/hvac-edge.db ] && [ -f $CONFIG ] && id hvac-edge"

if timeout 300 dpkg -P hvac-edge >"$TMP/purge" 2>&1; then pass "dpkg -P"; else fail "dpkg -P" "$TMP/purge"; fi
check "after -P: /var/lib/hvac-edge and /etc/hvac-edge are gone" sh -c '! [ -e /var/lib/hvac-edge ] && ! [ -e /etc/hvac-edge ]'
check "after -P: no user or group hvac-edge" sh -c '! getent passwd hvac-edge && ! getent group hvac-edge'
check "after -P: not known to dpkg" sh -c '! dpkg-query -W hvac-edge'
snapshot >"$TMP/after"
check "after -P: passwd, group, shadow, gshadow and the systemd directories as before" diff "$TMP/before" "$TMP/after"
find / -xdev \( -path /proc -o -path /sys -o -path /tmp -o -path /work -o -path /root \) -prune -o -name '*hvac-edge*' -print 2>/dev/null >"$TMP/left"
check "after -P: no file named *hvac-edge* outside /tmp, /work, /root (no stray /usr/bin/hvac-edge)" test ! -s "$TMP/left"

if [ "$failed" -eq 0 ]; then
    echo "deb-roundtrip $(basename "$DEB"): OK, $passed passed, 0 failed"
    exit 0
fi
echo "deb-roundtrip $(basename "$DEB"): FAILED, $passed passed, $failed failed: $(IFS=';'; echo "${failures[*]}" | sed 's/;/; /g')"
exit 1
