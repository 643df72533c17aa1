#!/usr/bin/env bash
# Writes llama.cpp's tokenizer test files (ggml-vocab-*.gguf, .inp, .out)
# into DIR from the pinned llama-cpp-python source package, which vendors
# llama.cpp. Used by crates/model/tests/gguf_tokenizers.rs:
#   benches/gguf_vocabs.sh ../gguf-vocabs
#   FEDVEIL_GGUF_VOCABS=../gguf-vocabs cargo test --release -p fedveil-model \
#       --test gguf_tokenizers -- --ignored --nocapture
# pip prepares a source package's metadata before it saves it; this one's
# build backend needs scikit-build-core and cmake, installed into a
# throw-away virtual environment (nothing is compiled).
set -euo pipefail
dir=${1:?usage: benches/gguf_vocabs.sh DIR}
version=0.3.16
sha256=34ed0f9bd9431af045bb63d9324ae620ad0536653740e9bb163a2e1fcb973be6
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 -m venv "$work/venv"
"$work/venv/bin/pip" install -q scikit-build-core cmake
PATH="$work/venv/bin:$PATH" "$work/venv/bin/pip" download -q --no-deps --no-binary :all: \
    --no-build-isolation "llama-cpp-python==$version" -d "$work"
archive="$work/llama_cpp_python-$version.tar.gz"
echo "$sha256  $archive" | sha256sum -c -
mkdir -p "$dir"
tar xzf "$archive" -C "$work" --wildcards "llama_cpp_python-$version/vendor/llama.cpp/models/ggml-vocab-*"
cp "$work/llama_cpp_python-$version/vendor/llama.cpp/models/"ggml-vocab-* "$dir/"
ls "$dir"
