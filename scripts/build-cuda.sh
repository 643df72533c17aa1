#!/usr/bin/env bash
# Builds fedveil with the `cuda` feature, on a machine with a GPU driver or
# without one, and packs what a GPU machine runs: the `fedveil` binary and,
# with --checks, the device test and the LoRA benchmark (see
# scripts/gpu-check.sh), each stripped and gzipped.
#
#   scripts/build-cuda.sh [--checks] [OUT_DIR]      (from the project root)
#
# CUDA 13 comes from the system where `nvcc` is on PATH, otherwise from pip
# packages installed into a virtual environment ($FEDVEIL_CUDA_VENV,
# default ../.venv-cuda). Where no driver is installed, the link step gets
# a stand-in libcuda.so.1 holding an empty function for every driver entry
# point cudarc declares; the binary records only the name libcuda.so.1 and
# loads the real driver's library at run time. CUDA_COMPUTE_CAP defaults to
# 90 (H100, H200). The build goes to target-cuda/ so that CPU builds in
# target/ are left as they are. About 10 minutes on 2 cores, cold.
set -euo pipefail

checks=0
if [ "${1:-}" = "--checks" ]; then
  checks=1
  shift
fi
out=${1:-gpu-out}
[ -f Cargo.toml ] && [ -d crates/model ] || {
  echo "run from the fedveil project's root" >&2
  exit 2
}

# 1. nvcc and CUDA's libraries.
if command -v nvcc >/dev/null 2>&1; then
  cuda_bin=$(dirname "$(command -v nvcc)")
  cuda_root=${CUDA_ROOT:-$(dirname "$cuda_bin")}
  libs="$cuda_root/lib64"
  [ -d "$libs" ] || libs="$cuda_root/lib"
else
  venv=${FEDVEIL_CUDA_VENV:-../.venv-cuda}
  [ -x "$venv/bin/pip" ] || python3 -m venv "$venv"
  "$venv/bin/pip" install -q nvidia-cuda-nvcc==13.0.88 'nvidia-nvvm==13.0.*' \
    'nvidia-cuda-crt==13.0.*' 'nvidia-cuda-runtime==13.0.*' 'nvidia-cuda-cccl==13.0.*' \
    'nvidia-cublas==13.0.*' 'nvidia-curand==10.*' 'nvidia-cuda-nvrtc==13.0.*'
  cuda_root=$(cd "$(ls -d "$venv"/lib/python3*/site-packages/nvidia/cu13 | head -n 1)" && pwd)
  cuda_bin="$cuda_root/bin"
  libs="$cuda_root/lib"
fi

# 2. A directory of unversioned names to link against (pip's packages
# ship only the versioned ones), and the driver's library or a stand-in.
link=$(pwd)/target-cuda/link
mkdir -p "$link"
for lib in cublas cublasLt curand nvrtc cudart; do
  found=$(ls "$libs"/lib"$lib".so* 2>/dev/null | sort | head -n 1 || true)
  [ -n "$found" ] || {
    echo "no lib$lib.so under $libs" >&2
    exit 1
  }
  ln -sf "$found" "$link/lib$lib.so"
done
if ldconfig -p 2>/dev/null | grep -q 'libcuda\.so\.1 '; then
  rm -f "$link/libcuda.so"
elif [ ! -f "$link/libcuda.so" ]; then
  cargo fetch -q
  decls=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-*/src/driver/sys/mod.rs | sort -V | tail -n 1)
  grep -ohE 'fn cu[A-Za-z0-9_]+' "$decls" | awk '{print $2}' | sort -u |
    awk '{print "void " $1 "(void) {}"}' >"$link/libcuda-stub.c"
  cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$link/libcuda.so" "$link/libcuda-stub.c"
fi

# 3. One cargo build, so that candle's kernels compile once.
export PATH="$cuda_bin:$PATH" CUDA_ROOT="$cuda_root" CUDA_PATH="$cuda_root"
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
export RUSTFLAGS="${RUSTFLAGS:-} -L native=$link" CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target-cuda}
targets=(-p fedveil --bin fedveil)
features=fedveil/cuda
if [ "$checks" = 1 ]; then
  targets+=(--bench lora -p fedveil-model --test device)
  features+=,fedveil-model/cuda
fi
cargo build --release --features "$features" "${targets[@]}" \
  --message-format=json-render-diagnostics >"$CARGO_TARGET_DIR/cuda-build.json"

# 4. Each executable, stripped and gzipped, named by its target.
mkdir -p "$out"
python3 - "$CARGO_TARGET_DIR/cuda-build.json" "$out" <<'EOF'
import json, shutil, subprocess, sys
for line in open(sys.argv[1]):
    m = json.loads(line)
    exe = m.get("executable") if m.get("reason") == "compiler-artifact" else None
    if not exe:
        continue
    kind = m["target"]["kind"][0]
    name = m["target"]["name"] + ("" if kind == "bin" else "-" + kind)
    dest = f"{sys.argv[2]}/{name}"
    shutil.copy(exe, dest)
    subprocess.run(["strip", dest], check=True)
    subprocess.run(["gzip", "-f", dest], check=True)
    print(f"{dest}.gz")
EOF
ls -la "$out"
