#!/usr/bin/env bash
# Every check of fedveil's GPU path in one run, on a GPU machine that has
# the driver, PyTorch, transformers and peft but no Rust toolchain and no
# network (issue 22). Build first, elsewhere: `scripts/build-cuda.sh
# --checks gpu-out`, then carry the project with gpu-out/ and run, from the
# project's root:
#
#   scripts/gpu-check.sh gpu-out OUT_DIR [STEP...]
#
# STEP is any of logits, device, lora, lora-1b, profile, federation (all,
# in that order, when none is named). A device call may run 10 minutes at
# most: run `logits device federation` (about 4 minutes) and `lora lora-1b`
# (about 6) as two calls on the same machine; the models are made once, in
# $GPU_CHECK_WORK (default /tmp/fedveil-gpu-check). Each step runs under its
# own time limit (those of either call add up to under 9 minutes); a failed
# step is recorded and the next one runs. OUT_DIR gets two files (a device
# tool returns only a few): summary.jsonl, one JSON line per measurement,
# also printed at the end, and logs.tar.gz, every step's log.
#  1. models: a SmolLM2-135M-shaped and a Llama-3.2-1B-shaped Hugging Face
#     directory with random bf16 weights, written by transformers;
#  2. logits: `fedveil model check --logits` on the GPU (bf16) against
#     transformers' f32 and bf16 logits of the same weights;
#  3. the device tests (crates/model/tests/device.rs) on the GPU: bf16
#     logits and every PEFT method's adapter gradients against the CPU's
#     f32, every method training;
#  4. LoRA steps against PyTorch + peft side by side (benches/lora.rs) at
#     batch 1, 8 and 32 x 256 tokens (135M) and 1 and 8 (1B): seconds per
#     step, tokens/s, peak GPU memory on both sides, every step's loss;
#  5. a `fedveil run` federation (3 clients sharing one copy of the frozen
#     weights, SecAgg+, DP) on the GPU, GPU memory sampled by nvidia-smi.
#
# GPU_CHECK_DEVICE=cpu is a dry run of the same steps on the CPU with a tiny
# model and CPU builds (target/release/), to check the plumbing where no
# GPU is: `cargo build --release --bench lora -p fedveil-model --test
# device` first.
set -uo pipefail

bin=${1:-gpu-out}
out=${2:-gpu-results}
shift 2 2>/dev/null || shift $#
steps=" ${*:-logits device lora lora-1b profile federation} "
device=${GPU_CHECK_DEVICE:-cuda}
python=${PYTHON:-python3}
mkdir -p "$out"
out=$(cd "$out" && pwd)
work=${GPU_CHECK_WORK:-/tmp/fedveil-gpu-check}
# This call's logs, outside OUT_DIR: they come back as one tarball.
logs="$work/logs"
rm -rf "$logs"
mkdir -p "$logs"
summary="$out/summary.jsonl"
: >"$summary"
wants() { [[ "$steps" == *" $1 "* ]]; }

# To stderr: a step may run inside $(...), whose stdout is its value.
log() { echo "[$(date +%H:%M:%S)] $*" | tee -a "$logs/steps.log" >&2; }
# step NAME LIMIT_S COMMAND...: runs COMMAND, its output in $logs/NAME.log.
step() {
  local name=$1 limit=$2
  shift 2
  log "$name: start"
  local t0=$SECONDS
  timeout "$limit" "$@" >"$logs/$name.log" 2>&1
  local rc=$?
  log "$name: exit $rc after $((SECONDS - t0)) s"
  echo "{\"step\": \"$name\", \"exit\": $rc, \"seconds\": $((SECONDS - t0))}" >>"$summary"
  return $rc
}

if [ "$device" = cuda ]; then
  # The binaries as built by scripts/build-cuda.sh --checks.
  for f in fedveil lora-bench device-test; do
    gunzip -c "$bin/$f.gz" >"$work/$f" && chmod +x "$work/$f" || log "missing $bin/$f.gz"
  done
  # CUDA 13's libraries: the system's, or those pip installed with torch.
  roots="/usr/local /usr/lib /usr/lib64 /opt $("$python" -c 'import site; print(" ".join(site.getsitepackages()))' 2>/dev/null)"
  # shellcheck disable=SC2086
  libs=$(find $roots \( -name 'libcublas.so.13*' -o -name 'libcurand.so.10*' \
    -o -name 'libnvrtc.so.13*' -o -name 'libcudart.so.13*' \) 2>/dev/null |
    xargs -r -n1 dirname | sort -u | paste -sd: -)
  export LD_LIBRARY_PATH="${libs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  nvidia-smi >"$logs/nvidia-smi.txt" 2>&1
  small=smollm2-135m
  large=llama-3.2-1b
else
  for f in fedveil; do cp target/release/$f "$work/$f"; done
  cp "$(ls -t target/release/deps/lora-* | grep -v '\.d$' | head -n 1)" "$work/lora-bench"
  cp "$(ls -t target/release/deps/device-* | grep -v '\.d$' | head -n 1)" "$work/device-test"
  small=tiny
  large=tiny
fi
log "device $device, binaries from $bin, results in $out"
"$python" -c 'import torch, transformers, peft; print(torch.__version__, transformers.__version__, peft.__version__, torch.cuda.is_available())' >"$logs/versions.txt" 2>&1

# The models, made once per machine.
model() {
  [ -f "$work/$1/model.safetensors" ] ||
    step "make-$1" 120 "$python" scripts/gpu_reference.py make "$1" "$work/$1" "$device"
  echo "$work/$1"
}

# 1-2. Logits against transformers'.
if wants logits; then
  for shape in $small $large; do
    dir=$(model "$shape")
    step "check-$shape" 90 "$work/fedveil" model check --model "$dir" --json \
      --logits "$work/$shape.logits.safetensors" &&
      step "logits-$shape" 90 "$python" scripts/gpu_reference.py logits "$dir" \
        "$work/$shape.logits.safetensors" "$device" &&
      tail -n 1 "$logs/logits-$shape.log" >>"$summary"
  done
fi

# 3. The device tests.
wants device && step device-tests 90 "$work/device-test" --test-threads 1 --nocapture

# 4. LoRA against PyTorch + peft: the side-by-side runs alone (a criterion
# filter matching none of its benchmarks skips criterion's part).
lora() { # NAME SHAPE BATCHES LIMIT
  local dir
  dir=$(model "$2")
  step "$1" "$4" env FEDVEIL_BENCH_DEVICE="$device" FEDVEIL_BENCH_MODEL="$dir" \
    FEDVEIL_BENCH_BATCH="$3" FEDVEIL_TORCH_PYTHON="$python" \
    "$work/lora-bench" --bench side-by-side &&
    grep '"bench":"lora"' "$logs/$1.log" >>"$summary"
}
wants lora && lora lora-$small $small 1,8,32 240
wants lora-1b && lora lora-$large $large 1,8 240

# 5. Where a step's time goes.
if wants profile; then
  if command -v nsys >/dev/null 2>&1; then
    dir=$(model $small)
    step profile 180 nsys profile --force-overwrite true -o "$work/lora-profile" \
      env FEDVEIL_BENCH_DEVICE="$device" FEDVEIL_BENCH_MODEL="$dir" FEDVEIL_BENCH_BATCH=8 \
      "$work/lora-bench" --bench --warm-up-time 1 --measurement-time 3 &&
      step profile-stats 60 nsys stats --report cuda_gpu_kern_sum,cuda_gpu_mem_time_sum,cuda_api_sum \
        "$work/lora-profile.nsys-rep"
  else
    log "profile: no nsys on this machine"
  fi
fi

# 6. A federation on the GPU (the tokenizer is byte-level: 512 tokens hold
# an Alpaca prompt and its answer).
if wants federation; then
dir=$(model $small)
rm -rf "$work/fed"
cat >"$work/fed.toml" <<EOF
[run]
clients = 3

[federation]
rounds = 2
cohort_size = 3
checkpoint_dir = "$work/fed/checkpoint"
metrics = "$work/fed/metrics.jsonl"

[training]
local_steps = 4
batch_size = 8
learning_rate = 0.0005

[optimizer]
kind = "fedavg"
server_lr = 1.0

[secagg]
threshold = 2

[dp]
placement = "distributed"
clip = 1.0
noise_multiplier = 1.0
delta = 1e-5
min_survivors = 3

[task]
kind = "llm"
model = "$dir"
data = "$(pwd)/configs/data/dolly-style.jsonl"
split = { kind = "meta" }
template = "alpaca"
eval_fraction = 0.2
max_len = 512
seed = 1

[task.peft]
method = "lora"
r = 8
alpha = 16
target_modules = ["q_proj", "v_proj"]
EOF
if [ "$device" = cuda ]; then
  nvidia-smi --query-gpu=timestamp,memory.used --format=csv,noheader -lms 250 >"$logs/fed-gpu-memory.csv" &
  sampler=$!
fi
step federation 180 "$work/fedveil" run "$work/fed.toml" --fresh
[ -n "${sampler:-}" ] && kill "$sampler"
cp "$work/fed/metrics.jsonl" "$logs/fed-metrics.jsonl" 2>/dev/null
if [ -s "$logs/fed-gpu-memory.csv" ]; then
  awk -F', ' '{gsub(/ MiB/, "", $2); if ($2 > m) m = $2} END {print "{\"federation_peak_gpu_memory_mib\": " m+0 "}"}' \
    "$logs/fed-gpu-memory.csv" >>"$summary"
fi
fi

log "done"
tar -czf "$out/logs.tar.gz" -C "$work" logs
cat "$summary"
