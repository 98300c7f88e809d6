#!/usr/bin/env bash
# Set up edgegemma in ./.venv (everything the tests need) and run Gemma 3 270M once.
# llama-cpp-python has no wheels on PyPI: pip compiles llama.cpp here (5-10 minutes on 2 cores).
set -euo pipefail
cd "$(dirname "$0")"

PYTHON=${PYTHON:-python3}
"$PYTHON" -c 'import sys; assert sys.version_info >= (3, 11), "edgegemma needs Python 3.11+"'

# For the tests only: the bench's ssh target is tested against a real sshd on localhost, and
# its device paths against arm64 builds run under qemu-user (docs/devices.md).
test_packages=""
for need in sshd:openssh-server ssh:openssh-client qemu-aarch64-static:qemu-user-static \
    aarch64-linux-gnu-gcc:gcc-aarch64-linux-gnu aarch64-linux-gnu-g++:g++-aarch64-linux-gnu \
    debootstrap:debootstrap cmake:cmake curl:curl mosquitto:mosquitto; do
    command -v "${need%%:*}" >/dev/null || [ -x "/usr/sbin/${need%%:*}" ] || test_packages="$test_packages ${need#*:}"
done
if [ -n "$test_packages" ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $test_packages >/dev/null
    else
        echo "note: the test suite also needs:$test_packages (Debian package names)" >&2
    fi
fi

[ -d .venv ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch first: its CPU wheel. The exact version it installed (2.13.0+cpu) is then held as a
# constraint: otherwise pip, backtracking over the converters' dependencies, may swap in the
# plain torch==2.13.0 wheel, which brings GBs of CUDA.
.venv/bin/python -m pip install torch==2.13.0
torch_pin=$(mktemp)
trap 'rm -f "$torch_pin"' EXIT
.venv/bin/python -c 'import importlib.metadata as m; print("torch==" + m.version("torch"))' >"$torch_pin"
.venv/bin/python -m pip install -e ".[dev]" --constraint "$torch_pin"

.venv/bin/edgegemma generate "The capital of France is" --max-tokens 24 --stats
