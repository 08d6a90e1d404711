#!/usr/bin/env bash
# Builds llama.cpp's own C++ `llama-server` and `llama-bench` (idempotent), CPU only, into
# ${LLMBENCH_CACHE:-~/.cache/llmbench}/llama.cpp/<version>/bin/, where the `llama_server` backend, `bench doctor` and
# benchmarks/engine_cpu.py look for them.
#
# The source is the llama.cpp that the llama-cpp-python sdist vendors, so the server and our in-process llama.cpp
# (the `llamacpp` extra) are the same engine at the same commit. Nothing prebuilt is downloaded: pip fetches the
# sdist from the package index (kept beside the build), and the web UI is left out (its CMake would otherwise fetch
# prebuilt assets). `-DGGML_NATIVE=OFF` makes a portable build, as the README's llama-cpp-python install does: a
# `-march=native` binary copied to another CPU may crash. Static, so the two binaries need no library path.
# Environment: JOBS (default 2) parallel compile jobs.
set -euo pipefail
cd "$(dirname "$0")/.."
version=0.3.36
root="${LLMBENCH_CACHE:-$HOME/.cache/llmbench}/llama.cpp/$version"
bin="$root/bin"

if "$bin/llama-server" --version >/dev/null 2>&1 && "$bin/llama-bench" --help >/dev/null 2>&1; then
    echo "llama-server already built in $bin"
    exit 0
fi

mkdir -p "$root"
sdist="$root/llama_cpp_python-$version.tar.gz"
if [ ! -s "$sdist" ]; then
    pip=(python3 -m pip)
    [ -x .venv/bin/pip ] && pip=(.venv/bin/pip)  # the README's commands make .venv first; a bare python3 may lack pip
    "${pip[@]}" download -q --no-binary :all: --no-deps "llama-cpp-python==$version" -d "$root"
fi

work=$(mktemp -d "$root/build.XXXXXX")
trap 'rm -rf "$work"' EXIT
# The submodule's git folder too: the build stamps its commit into `llama-server --version`.
tar -xzf "$sdist" -C "$work" "llama_cpp_python-$version/vendor/llama.cpp" \
    "llama_cpp_python-$version/.git/modules/vendor/llama.cpp"
src="$work/llama_cpp_python-$version/vendor/llama.cpp"
cmake -S "$src" -B "$work/build" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF \
    -DGGML_NATIVE=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF >"$work/cmake.log" \
    || { cat "$work/cmake.log" >&2; exit 1; }
nice -n 10 cmake --build "$work/build" --target llama-server llama-bench -j "${JOBS:-2}"

# Both binaries land at once (a half-installed bin/ would pass the check above on the next run).
mkdir -p "$work/bin"
cp "$work/build/bin/llama-server" "$work/build/bin/llama-bench" "$work/bin/"
rm -rf "$bin"
mv "$work/bin" "$bin"
"$bin/llama-server" --version 2>&1 | head -n 2
echo "llama-server and llama-bench built in $bin"
