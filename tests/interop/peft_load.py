"""Loads a LoRA adapter that fedveil wrote onto the same base model with
Hugging Face transformers + peft and compares logits with fedveil's.

Run by `crates/model/tests/peft_interop.rs` (an ignored test: it needs the
default model in the cache and a Python with torch, transformers and peft):

    FEDVEIL_PEFT_PYTHON=.venv-torch/bin/python \
        cargo test --release -p fedveil-model --test peft_interop -- --ignored

Input: a directory holding the adapter (adapter_config.json,
adapter_model.safetensors) and fedveil.json ({"gguf", "ids", "base",
"adapted"}: the token ids and fedveil's logits without and with the
adapter, flattened). Output: one JSON line with the largest absolute
differences; and, in peft_made/, an adapter PEFT itself made (LoRA r=4 on
k_proj, o_proj and down_proj) with PEFT's logits, for fedveil to load.
"""

import json
import os
import sys


def main():
    adapter_dir = sys.argv[1]
    with open(os.path.join(adapter_dir, "fedveil.json")) as f:
        ours = json.load(f)

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    gguf = ours["gguf"]
    base = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(gguf), gguf_file=os.path.basename(gguf), dtype=torch.float32
    )
    model = PeftModel.from_pretrained(base, adapter_dir)
    model.eval()
    ids = torch.tensor([ours["ids"]])
    with torch.no_grad():
        adapted = model(input_ids=ids).logits.flatten()
        with model.disable_adapter():
            plain = model(input_ids=ids).logits.flatten()
    # The other direction: an adapter PEFT makes (B moved off zero, as
    # training would), saved for fedveil to load, with PEFT's logits.
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    fresh = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(gguf), gguf_file=os.path.basename(gguf), dtype=torch.float32
    )
    theirs = get_peft_model(
        fresh,
        LoraConfig(r=4, lora_alpha=8, target_modules=["k_proj", "o_proj", "down_proj"],
                   task_type="CAUSAL_LM"),
    )
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.01)
    theirs.eval()
    out_dir = os.path.join(adapter_dir, "peft_made")
    theirs.save_pretrained(out_dir)
    with torch.no_grad():
        theirs_logits = theirs(input_ids=ids).logits.flatten()
    with open(os.path.join(out_dir, "peft.json"), "w") as f:
        json.dump({"logits": theirs_logits.tolist()}, f)

    ours_base = torch.tensor(ours["base"])
    ours_adapted = torch.tensor(ours["adapted"])
    print(
        json.dumps(
            {
                "peft_type": model.peft_config["default"].peft_type.value,
                "base_max_abs_diff": float((plain - ours_base).abs().max()),
                "adapted_max_abs_diff": float((adapted - ours_adapted).abs().max()),
                "adapter_effect": float((adapted - plain).abs().max()),
                "logit_scale": float(plain.abs().max()),
            }
        )
    )


if __name__ == "__main__":
    main()
