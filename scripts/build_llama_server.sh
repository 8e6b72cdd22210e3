#!/usr/bin/env bash
# Build llama.cpp's `llama-server` once, from the llama.cpp sources inside the llama-cpp-python sdist of the version
# installed in the venv (so server and rollout backend are the same llama.cpp), and link it into the venv's bin/.
# The binary is kept in a per-user cache keyed by that version: a fresh clone or venv on this machine reuses it.
# First build: ~5-10 min on 2 cores. Used by the export -> llama-server agreement test (tests/steering/test_export.py).
set -euo pipefail
VENV=${1:-.venv}
version=$("$VENV/bin/python" -c "import importlib.metadata as m; print(m.version('llama_cpp_python'))")
cache=${BREP_RL_CACHE:-$HOME/.cache/brep_rl}/llama-server-$version  # the cache brep_rl.model uses too
if [[ ! -x $cache/llama-server ]]; then
    echo "setup: building llama-server $version (first time only, ~5-10 min on 2 cores)"
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    "$VENV/bin/python" -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$version" -d "$work" 2>&1 \
        | { grep -v "is ignored: it is neither" || true; }
    tar xzf "$work"/llama_cpp_python-"$version".tar.gz -C "$work"
    src=$work/llama_cpp_python-$version/vendor/llama.cpp
    cmake -S "$src" -B "$work/build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF -DLLAMA_CURL=OFF \
        -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON >"$work/cmake.log" 2>&1 \
        || { tail -20 "$work/cmake.log"; exit 1; }
    cmake --build "$work/build" --target llama-server -j "$(nproc)" >"$work/build.log" 2>&1 || { tail -30 "$work/build.log"; exit 1; }
    mkdir -p "$cache"
    cp "$work/build/bin/llama-server" "$cache/llama-server.tmp" && mv "$cache/llama-server.tmp" "$cache/llama-server"
fi
ln -sf "$cache/llama-server" "$VENV/bin/llama-server"
