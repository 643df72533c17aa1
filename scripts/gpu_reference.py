"""The reference side of scripts/gpu-check.sh (transformers, on the same
device as fedveil).

  python3 gpu_reference.py make SHAPE DIR [DEVICE]
      writes a Hugging Face directory of SHAPE with random weights (seed 0,
      stored in bf16, as released checkpoints are): config.json,
      model.safetensors and a byte-level tokenizer.json whose vocabulary
      fills the model's. SHAPE: smollm2-135m, llama-3.2-1b, or tiny (for a
      dry run on the CPU).
  python3 gpu_reference.py logits DIR FEDVEIL_LOGITS DEVICE
      compares the logits `fedveil model check --logits` wrote with
      transformers' for the same ids and weights, in f32 and in bf16, and
      prints one JSON line: fedveil's and transformers' bf16 logits'
      largest difference from transformers' f32 (and fedveil's from
      transformers' bf16), over the largest f32 logit, and the share of
      positions whose top token agrees.

Speed does not depend on the weights' values, and both sides load the same
weights, so random ones serve the comparisons.
"""

import json
import sys

import torch

SHAPES = {
    # HuggingFaceTB/SmolLM2-135M's config.
    "smollm2-135m": dict(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
        rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True,
    ),
    # meta-llama/Llama-3.2-1B's config.
    "llama-3.2-1b": dict(
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, head_dim=64,
        max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=True,
        rope_parameters=dict(
            rope_type="llama3", rope_theta=500000.0, factor=32.0, high_freq_factor=4.0,
            low_freq_factor=1.0, original_max_position_embeddings=8192,
        ),
    ),
    "tiny": dict(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True,
    ),
}


def make(shape, out, device):
    from tokenizers import Tokenizer, decoders, models
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(bos_token_id=1, eos_token_id=2, hidden_act="silu", **SHAPES[shape])
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg)
    model.to(torch.bfloat16).save_pretrained(out)  # safetensors
    vocab = {c: i for i, c in enumerate(sorted(ByteLevel.alphabet()))}
    for i in range(len(vocab), cfg.vocab_size):
        vocab[f"<extra_{i}>"] = i
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.save(f"{out}/tokenizer.json")
    print(json.dumps({"made": out, "shape": shape,
                      "parameters": sum(p.numel() for p in model.parameters())}))


def logits(model_dir, fedveil_file, device):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    theirs = load_file(fedveil_file)
    ids = theirs["ids"].to(torch.long).unsqueeze(0).to(device)
    fedveil = theirs["logits"].float()
    out = {"model": model_dir, "tokens": ids.shape[1], "vocab": fedveil.shape[-1]}
    ref = None
    for name, dtype in (("f32", torch.float32), ("bf16", torch.bfloat16)):
        m = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype,
                                                 attn_implementation="eager").to(device).eval()
        with torch.no_grad():
            got = m(ids).logits[0].float().cpu()
        del m
        if ref is None:
            ref = got
            out["max_abs_logit"] = float(ref.abs().max())
        else:
            out["transformers_bf16_vs_f32"] = float((got - ref).abs().max() / ref.abs().max())
            out["fedveil_vs_transformers_bf16"] = float(
                (fedveil - got).abs().max() / ref.abs().max())
    out["fedveil_vs_transformers_f32"] = float((fedveil - ref).abs().max() / ref.abs().max())
    out["same_argmax"] = float((fedveil.argmax(-1) == ref.argmax(-1)).float().mean())
    print(json.dumps(out))


if __name__ == "__main__":
    if sys.argv[1] == "make":
        make(sys.argv[2], sys.argv[3], sys.argv[4] if len(sys.argv) > 4 else "cpu")
    elif sys.argv[1] == "logits":
        logits(sys.argv[2], sys.argv[3], sys.argv[4])
    else:
        sys.exit(f"unknown command {sys.argv[1]!r}: make or logits")
