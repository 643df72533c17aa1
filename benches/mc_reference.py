"""A reference multiple-choice scorer: zero-shot accuracy by log-likelihood
with Hugging Face transformers, computed exactly as lm-evaluation-harness's
`loglikelihood` requests compute it, on the records `fedveil data prepare`
writes, for comparison with `fedveil model eval` (BENCHMARKS.md).

    python3 benches/mc_reference.py --gguf MODEL.gguf \
        --records arc_easy-validation.jsonl [--limit N] [--scores OUT.jsonl] \
        [--adapter DIR]

With --adapter, the model is the base with that PEFT adapter
(`PeftModel.from_pretrained`): an adapter a fedveil server wrote, say.

- Each choice is a continuation of the record's `instruction` (the
  zero-shot prompt); context and continuation are split as
  lm-evaluation-harness's `_encode_pair` splits them (trailing white space
  of the context moves to the continuation, the whole text is encoded
  without special tokens, the continuation is what follows the context's
  own tokens). fedveil encodes with the tokenizer's special tokens, which
  for SmolLM2 are none: the same ids; on a tokenizer that adds a BOS the two
  differ by it.
- One forward pass per choice over the last `max_len + 1` tokens; the
  score is the summed log-softmax of the continuation's tokens (float32).
- `acc`: the choice with the highest score; `acc_norm`: the highest score
  per character of the choice without its joining space. Ties go to the
  first (numpy's argmax).

Needs torch, transformers, accelerate and gguf (transformers reads the GGUF
file and dequantises it to float32: the same weights fedveil dequantises),
and peft for --adapter.
"""

import argparse
import json
import math
import os
import sys
import time


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--gguf", required=True)
    p.add_argument("--records", required=True)
    p.add_argument("--limit", type=int, default=0)
    p.add_argument("--max-len", type=int, default=2048)
    p.add_argument("--scores")
    p.add_argument("--adapter")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = p.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(args.threads)
    folder, name = os.path.split(os.path.abspath(args.gguf))
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, dtype=torch.float32
    )
    if args.adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, args.adapter)
    model.eval()

    records = [json.loads(line) for line in open(args.records) if line.strip()]
    if args.limit:
        records = records[: args.limit]

    def encode(text):
        return tok(text, add_special_tokens=False).input_ids

    def encode_pair(context, continuation):
        n = len(context) - len(context.rstrip())
        if n:
            continuation = context[-n:] + continuation
            context = context[:-n]
        whole = encode(context + continuation)
        ctx = encode(context)
        if not ctx:
            ctx = [tok.eos_token_id]
            return ctx, encode(continuation)
        return ctx, whole[len(ctx):]

    def loglikelihood(ctx, cont):
        ids = (ctx + cont)[-(args.max_len + 1):]
        inp = torch.tensor([ids[:-1]])
        with torch.no_grad():
            logits = model(inp).logits[0].float()
        logp = torch.log_softmax(logits, dim=-1)
        first = len(ids) - 1 - len(cont)
        return float(
            sum(logp[first + j, t].item() for j, t in enumerate(cont))
        )

    started = time.time()
    hits = hits_norm = 0
    out = []
    for i, r in enumerate(records):
        context = r["instruction"] if not r.get("input") else r["instruction"] + "\n" + r["input"]
        lls = [loglikelihood(*encode_pair(context, c)) for c in r["choices"]]
        chars = [max(1, len(c[1:] if c.startswith(" ") else c)) for c in r["choices"]]
        pred = max(range(len(lls)), key=lambda k: (lls[k], -k))
        pred_norm = max(range(len(lls)), key=lambda k: (lls[k] / chars[k], -k))
        hits += pred == r["gold"]
        hits_norm += pred_norm == r["gold"]
        out.append(
            {"index": i, "gold": r["gold"], "predicted": pred,
             "predicted_norm": pred_norm, "loglikelihoods": lls, "chars": chars}
        )
    n = len(records)

    def stderr(k):
        q = k / n
        return math.sqrt(q * (1 - q) / (n - 1)) if n > 1 else 0.0

    summary = {
        "records": args.records, "adapter": args.adapter, "questions": n,
        "accuracy": hits / n, "accuracy_stderr": stderr(hits),
        "accuracy_norm": hits_norm / n, "accuracy_norm_stderr": stderr(hits_norm),
        "seconds": time.time() - started,
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
    }
    if args.scores:
        with open(args.scores, "w") as f:
            for line in out:
                f.write(json.dumps(line) + "\n")
    json.dump(summary, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
