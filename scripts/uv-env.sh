# Sourced by setup-venv.sh and lock.sh: the installer (uv, in .tools/) and where torch's
# CPU build comes from. Not executable on its own.
#
# torch==X+cpu is not on the public package index. It is taken from, in order:
#   1. the folder in $UNIPOOL_TORCH_WHEELS;
#   2. a folder that pip's own configuration names as find-links and that holds the wheel
#      (machines with a local wheel folder);
#   3. PyTorch's CPU index ($TORCH_CPU_INDEX, default https://download.pytorch.org/whl/cpu),
#      downloaded once into .tools/wheels/.
# The lock pins the wheel's hash wherever it comes from.

PYTHON=${PYTHON:-python3}
TOOLS=.tools
UV="$TOOLS/bin/uv"
LOCK_PYTHON=3.11  # the Python the CPU lock is resolved for
TORCH_CPU_INDEX=${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}
# uv does not read pip's configuration; this machine's TLS may go through a local CA bundle.
if [ -z "${SSL_CERT_FILE:-}" ] && [ -f /etc/ssl/certs/ca-certificates.crt ]; then
    export SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt
fi

die() { echo "[$(basename "$0" .sh)] error: $*" >&2; exit 1; }

check_python() {
    local version
    version=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null) \
        || die "no '$PYTHON' found: install Python $LOCK_PYTHON (or set PYTHON=/path/to/python$LOCK_PYTHON)"
    [ "$version" = "$LOCK_PYTHON" ] \
        || die "$PYTHON is Python $version; the lock is resolved for Python $LOCK_PYTHON (set PYTHON=python$LOCK_PYTHON)"
}

# Installs the pinned uv into .tools/ (pip, hash-checked) unless it is already there.
ensure_uv() {
    local want
    want=$(sed -n 's/^uv==\([^ ]*\).*/\1/p' locks/tools.txt)
    if [ -x "$UV" ] && [ "$("$UV" --version | cut -d' ' -f2)" = "$want" ]; then
        return 0
    fi
    echo "[setup] installing uv $want into $TOOLS/"
    rm -rf "$TOOLS/bin" "$TOOLS/uv" "$TOOLS"/uv-*
    local log
    log=$(mktemp)
    "$PYTHON" -m pip install --disable-pip-version-check --root-user-action=ignore --require-hashes --no-deps \
        --target "$TOOLS" -r locks/tools.txt >"$log" 2>&1 \
        || { cat "$log" >&2; rm -f "$log"; die "could not install uv from locks/tools.txt"; }
    rm -f "$log"
}

# Prints a folder holding torch-$1-*.whl (see the header), downloading it when needed.
torch_wheels() {
    local version=$1 dir links
    links=$("$PYTHON" -m pip config get global.find-links 2>/dev/null || true)
    for dir in ${UNIPOOL_TORCH_WHEELS:-} $links "$TOOLS/wheels"; do
        if compgen -G "$dir/torch-$version-*.whl" >/dev/null; then
            echo "$dir"
            return 0
        fi
    done
    mkdir -p "$TOOLS/wheels"
    echo "[setup] downloading torch $version from $TORCH_CPU_INDEX" >&2
    "$PYTHON" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
        --index-url "$TORCH_CPU_INDEX" -d "$TOOLS/wheels" "torch==$version" >&2 \
        || die "torch $version is in no local wheel folder and $TORCH_CPU_INDEX could not be reached"
    echo "$TOOLS/wheels"
}
