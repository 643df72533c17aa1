"""PyTorch + transformers + peft baseline for `cargo bench --bench lora`.

LoRA training steps on SmolLM2-135M-Instruct loaded from the same GGUF file
fedveil uses (transformers dequantises it to f32), on the CPU, with the
same shape as the Rust benchmark: LoRA r=8, alpha=16, dropout 0.05 on
q_proj and v_proj, AdamW, random token ids, loss on every token. Prints one
JSON line: seconds per step (median of the timed steps), tokens per
second, and this process's peak resident memory.

Usage: python lora_torch.py --gguf PATH [--batch 1] [--seq 256] [--steps 5]
       [--warmup 2] [--threads 2]
"""

import argparse
import json
import os
import resource
import statistics
import time


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--gguf", required=True)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    a = p.parse_args()

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(os.path.abspath(a.gguf)),
        gguf_file=os.path.basename(a.gguf),
        dtype=torch.float32,
    )
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
    ids = torch.randint(0, vocab, (a.batch, a.seq))
    times = []
    for step in range(a.warmup + a.steps):
        t0 = time.perf_counter()
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        if step >= a.warmup:
            times.append(dt)
    step_s = statistics.median(times)
    print(
        json.dumps(
            {
                "impl": "pytorch",
                "torch": torch.__version__,
                "threads": a.threads,
                "batch": a.batch,
                "seq": a.seq,
                "step_s": step_s,
                "tokens_per_s": a.batch * a.seq / step_s,
                "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                "trainable": sum(q.numel() for q in params),
                "loss": out.loss.item(),
            }
        )
    )


if __name__ == "__main__":
    main()
