//! Helpers shared by the model crate's integration tests.

use std::collections::HashMap;

use candle_core::Tensor;

/// Rewrites the layers' q/k/v and gate/up projections (Llama's names) as
/// Phi-3's fused `qkv_proj` (rows q, k, v) and `gate_up_proj` (gate first).
pub fn fuse_phi3(t: &mut HashMap<String, Tensor>, layers: usize) {
    for i in 0..layers {
        let p = format!("model.layers.{i}");
        for (fused, parts) in [
            (
                "self_attn.qkv_proj",
                ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"].as_slice(),
            ),
            (
                "mlp.gate_up_proj",
                ["mlp.gate_proj", "mlp.up_proj"].as_slice(),
            ),
        ] {
            let parts: Vec<Tensor> = parts
                .iter()
                .map(|n| t.remove(&format!("{p}.{n}.weight")).unwrap())
                .collect();
            t.insert(
                format!("{p}.{fused}.weight"),
                Tensor::cat(&parts, 0).unwrap(),
            );
        }
    }
}
