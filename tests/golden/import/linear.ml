# Translated from the mergekit config linear.yml by `mergelang import`.
# mergekit computes this merge in float16 (`dtype`); mergelang always computes in float32.

orca_mini_v3_13b = model("psmathur/orca_mini_v3_13b")
wizardlm_13b_v1_2 = model("WizardLM/WizardLM-13B-V1.2")
platypus2_13b = model("garage-bAInd/Platypus2-13B")

output linear(
    [orca_mini_v3_13b, wizardlm_13b_v1_2, platypus2_13b],
    weights=[1.0, 0.3, 0.5],
), dtype="fp16"
