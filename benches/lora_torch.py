"""PyTorch + transformers + peft baseline for `cargo bench --bench lora`.

LoRA training steps on the model fedveil trains (a GGUF file, which
transformers dequantises, or a Hugging Face directory), on the CPU in f32
or on a GPU (`--device cuda`, the base in `--dtype bf16`, the adapter in
f32 as peft keeps it), with the same shape as the Rust benchmark: LoRA
r=8, alpha=16, dropout 0.05 on q_proj and v_proj, AdamW, random token ids,
loss on every token. Prints one JSON line: seconds per step (median of the
timed steps, the GPU synchronised around each), tokens per second, every
step's loss, this process's peak resident memory and, on a GPU, the peak
memory PyTorch allocated.

Usage: python lora_torch.py --model PATH [--batch 1] [--seq 256] [--steps 5]
       [--warmup 2] [--threads 2] [--device cpu|cuda] [--dtype f32|bf16]
"""

import argparse
import json
import os
import resource
import statistics
import time


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", "--gguf", dest="model", required=True)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--dtype", choices=["f32", "bf16"], default="f32")
    a = p.parse_args()

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    dtype = {"f32": torch.float32, "bf16": torch.bfloat16}[a.dtype]
    if os.path.isdir(a.model):
        model = AutoModelForCausalLM.from_pretrained(a.model, dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(
            os.path.dirname(os.path.abspath(a.model)),
            gguf_file=os.path.basename(a.model),
            dtype=dtype,
        )
    model = model.to(a.device)
    model = get_peft_model(
        model,
        LoraConfig(
            r=8,
            lora_alpha=16,
            lora_dropout=0.05,
            target_modules=["q_proj", "v_proj"],
            task_type="CAUSAL_LM",
        ),
    )
    model.train()
    params = [q for q in model.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (a.batch, a.seq)).to(a.device)
    gpu = a.device == "cuda"

    def sync():
        if gpu:
            torch.cuda.synchronize()

    if gpu:
        torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for step in range(a.warmup + a.steps):
        sync()
        t0 = time.perf_counter()
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        dt = time.perf_counter() - t0
        if step >= a.warmup:
            times.append(dt)
        losses.append(round(out.loss.item(), 4))
    step_s = statistics.median(times)
    print(
        json.dumps(
            {
                "impl": "pytorch",
                "torch": torch.__version__,
                "threads": a.threads,
                "device": a.device,
                "dtype": a.dtype,
                "adapter_dtype": str(params[0].dtype),
                "batch": a.batch,
                "seq": a.seq,
                "step_s": step_s,
                "tokens_per_s": a.batch * a.seq / step_s,
                "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                "peak_gpu_bytes": torch.cuda.max_memory_allocated() if gpu else 0,
                "trainable": sum(q.numel() for q in params),
                "losses": losses,
            }
        )
    )


if __name__ == "__main__":
    main()
