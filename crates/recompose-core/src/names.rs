//! The one mapping table between HF tensor names (used by the model code) and GGUF names.

use crate::config::Arch;

/// (HF suffix inside `model.layers.N.`, GGUF suffix inside `blk.N.`) per architecture.
fn layer_table(arch: Arch) -> &'static [(&'static str, &'static str)] {
    const COMMON: [(&str, &str); 9] = [
        ("input_layernorm.weight", "attn_norm.weight"),
        ("self_attn.q_proj.weight", "attn_q.weight"),
        ("self_attn.k_proj.weight", "attn_k.weight"),
        ("self_attn.v_proj.weight", "attn_v.weight"),
        ("self_attn.o_proj.weight", "attn_output.weight"),
        ("mlp.gate_proj.weight", "ffn_gate.weight"),
        ("mlp.up_proj.weight", "ffn_up.weight"),
        ("mlp.down_proj.weight", "ffn_down.weight"),
        ("self_attn.q_norm.weight", "attn_q_norm.weight"),
    ];
    const LLAMA: [(&str, &str); 10] = [
        COMMON[0],
        COMMON[1],
        COMMON[2],
        COMMON[3],
        COMMON[4],
        COMMON[5],
        COMMON[6],
        COMMON[7],
        ("post_attention_layernorm.weight", "ffn_norm.weight"),
        ("self_attn.k_norm.weight", "attn_k_norm.weight"),
    ];
    const GEMMA3: [(&str, &str); 13] = [
        COMMON[0],
        COMMON[1],
        COMMON[2],
        COMMON[3],
        COMMON[4],
        COMMON[5],
        COMMON[6],
        COMMON[7],
        COMMON[8],
        ("self_attn.k_norm.weight", "attn_k_norm.weight"),
        ("post_attention_layernorm.weight", "post_attention_norm.weight"),
        ("pre_feedforward_layernorm.weight", "ffn_norm.weight"),
        ("post_feedforward_layernorm.weight", "post_ffw_norm.weight"),
    ];
    match arch {
        Arch::Llama => &LLAMA,
        Arch::Gemma3 => &GEMMA3,
    }
}

const GLOBAL: [(&str, &str); 4] = [
    ("model.embed_tokens.weight", "token_embd.weight"),
    ("model.norm.weight", "output_norm.weight"),
    ("lm_head.weight", "output.weight"),
    ("rope_freqs.weight", "rope_freqs.weight"),
];

pub fn hf_to_gguf(arch: Arch, hf: &str) -> Option<String> {
    if let Some((_, g)) = GLOBAL.iter().find(|(h, _)| *h == hf) {
        return Some((*g).to_string());
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, suffix) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (_, g) = layer_table(arch).iter().find(|(h, _)| *h == suffix)?;
    Some(format!("blk.{layer}.{g}"))
}

pub fn gguf_to_hf(arch: Arch, g: &str) -> Option<String> {
    if let Some((h, _)) = GLOBAL.iter().find(|(_, gg)| *gg == g) {
        return Some((*h).to_string());
    }
    let rest = g.strip_prefix("blk.")?;
    let (layer, suffix) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (h, _) = layer_table(arch).iter().find(|(_, gg)| *gg == suffix)?;
    Some(format!("model.layers.{layer}.{h}"))
}

/// Is this an RMSNorm weight? (Gemma stores them as `w` in HF and `1 + w` in GGUF.)
pub fn is_norm(hf: &str) -> bool {
    hf.ends_with("norm.weight")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for arch in [Arch::Llama, Arch::Gemma3] {
            for (h, _) in layer_table(arch) {
                let hf = format!("model.layers.7.{h}");
                let g = hf_to_gguf(arch, &hf).unwrap();
                assert_eq!(gguf_to_hf(arch, &g).unwrap(), hf);
            }
        }
        assert_eq!(
            hf_to_gguf(Arch::Llama, "model.layers.3.post_attention_layernorm.weight").unwrap(),
            "blk.3.ffn_norm.weight"
        );
        assert_eq!(
            hf_to_gguf(Arch::Gemma3, "model.layers.3.pre_feedforward_layernorm.weight").unwrap(),
            "blk.3.ffn_norm.weight"
        );
        assert_eq!(hf_to_gguf(Arch::Llama, "model.layers.x.mlp.up_proj.weight"), None);
    }
}
