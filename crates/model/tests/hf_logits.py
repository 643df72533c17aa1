"""Logits of a Hugging Face model directory by transformers, for fedveil's
interop test (crates/model/tests/hf_interop.rs).

    python hf_logits.py DIR IDS_JSON OUT_JSON [CONFIG_DIR]

Loads DIR with AutoModelForCausalLM in float32 on the CPU (eager attention,
so every mask and scale is transformers' own), runs the token ids (a JSON
list of lists), and writes the logits as a nested JSON list. With
CONFIG_DIR, also writes there the config.json this transformers version
writes for the model (transformers 5 moves rope_theta and rope_scaling
into rope_parameters).
"""

import json
import sys

import torch
from transformers import AutoModelForCausalLM


def main() -> None:
    model_dir, ids_json, out_json = sys.argv[1:4]
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation="eager"
    )
    model.eval()
    ids = torch.tensor(json.loads(ids_json), dtype=torch.long)
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    with open(out_json, "w") as f:
        json.dump(logits.tolist(), f)
    if len(sys.argv) > 4:
        model.config.save_pretrained(sys.argv[4])


if __name__ == "__main__":
    main()
