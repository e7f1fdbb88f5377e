# Translated from the mergekit config orcamini-platy-44layer.yml by `mergelang import`.
# mergekit computes this merge in float16 (`dtype`); mergelang always computes in float32.

orca_mini_v3_13b = model("psmathur/orca_mini_v3_13b")
platypus2_13b = model("garage-bAInd/Platypus2-13B")

output stack(layer_range(orca_mini_v3_13b, 0, 24), layer_range(platypus2_13b, 20, 40)), dtype="fp16"
