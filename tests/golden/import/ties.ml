# Translated from the mergekit config ties.yml by `mergelang import`.
# mergekit computes this merge in float16 (`dtype`); mergelang always computes in float32.

llama_2_13b_fp16 = model("TheBloke/Llama-2-13B-fp16")
orca_mini_v3_13b = model("psmathur/orca_mini_v3_13b")
platypus2_13b = model("garage-bAInd/Platypus2-13B")
wizardmath_13b_v1_0 = model("WizardLM/WizardMath-13B-V1.0")

output ties(
    llama_2_13b_fp16,
    [orca_mini_v3_13b, platypus2_13b, wizardmath_13b_v1_0],
    weights=[1.0, layers(0, 0.3, 0.7, 1), match tensor { "mlp" => 0.5, _ => 0 }],
    density=[layers(1, 0.7, 0.1), 0.5, 0.33],
    normalize=true,
    int8_mask=true,
), dtype="fp16"
