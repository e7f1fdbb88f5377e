# Translated from the mergekit config gradient-slerp.yml by `mergelang import`.
# mergekit computes this merge in float16 (`dtype`); mergelang always computes in float32.

orca_mini_v3_13b = model("psmathur/orca_mini_v3_13b")
platypus2_13b = model("garage-bAInd/Platypus2-13B")

output slerp(
    layer_range(orca_mini_v3_13b, 0, 40),
    layer_range(platypus2_13b, 0, 40),
    t=match tensor {
        "self_attn" => layers(0, 0.5, 0.3, 0.7, 1),
        "mlp" => layers(1, 0.5, 0.7, 0.3, 0),
        _ => 0.5,
    },
), dtype="fp16"
