#!/usr/bin/env bash
# Installs the command-line tools that tests/deploy and tests/console run, when they are missing:
#   promtool  Debian package `prometheus`
#   kubectl   (with kustomize built in) only if absent; from apt when a source offers it
#   chromium  Debian package `chromium` (/usr/bin/chromium): the headless browser the steering
#             console's tests drive through Playwright
# hadolint, kubernetes-validate and playwright come from PyPI through the `dev` extra.
# Quick and idempotent: does nothing when the tools are already there.
set -euo pipefail

missing=()
command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
command -v kubectl >/dev/null 2>&1 || missing+=(kubectl)
[ -x /usr/bin/chromium ] || missing+=(chromium)
[ "${#missing[@]}" -eq 0 ] && exit 0

if [ "$(id -u)" -eq 0 ]; then
    SUDO=()
elif command -v sudo >/dev/null 2>&1; then
    SUDO=(sudo -n)
else
    echo "[setup-tools] need root (or sudo) to apt-get install: ${missing[*]}; tests/deploy and tests/console will fail without them" >&2
    exit 0
fi

echo "[setup-tools] installing: ${missing[*]}"
"${SUDO[@]}" apt-get update -qq

installable=()
for pkg in "${missing[@]}"; do
    candidate=$(apt-cache policy "$pkg" 2>/dev/null | awk '/Candidate:/ {print $2}')
    if [ -n "$candidate" ] && [ "$candidate" != "(none)" ]; then
        installable+=("$pkg")
    else
        echo "[setup-tools] no apt source offers '$pkg': the tests that need it will fail" >&2
    fi
done
[ "${#installable[@]}" -eq 0 ] && exit 0

"${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive \
    apt-get install -y -qq --no-install-recommends "${installable[@]}" >/dev/null

# Only promtool is wanted from `prometheus`: where systemd runs, keep its server off.
if [[ " ${installable[*]} " == *" prometheus "* ]] && [ -d /run/systemd/system ]; then
    "${SUDO[@]}" systemctl disable --now prometheus >/dev/null 2>&1 || true
fi
echo "[setup-tools] ok: $(command -v promtool || echo 'no promtool'), $(command -v kubectl || echo 'no kubectl'), $( [ -x /usr/bin/chromium ] && echo /usr/bin/chromium || echo 'no chromium')"
