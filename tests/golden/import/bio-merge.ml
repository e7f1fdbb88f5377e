# Translated from the mergekit config bio-merge.yml by `mergelang import`.
# mergekit computes this merge in float16 (`dtype`); mergelang always computes in float32.

mistral_7b_v0_1 = model("mistralai/Mistral-7B-v0.1")
mistral_7b_instruct_v0_2 = model("mistralai/Mistral-7B-Instruct-v0.2")
biomistral_7b = model("BioMistral/BioMistral-7B")

output ties(
    mistral_7b_v0_1,
    [mistral_7b_instruct_v0_2, biomistral_7b],
    weights=[0.5, 0.5],
    density=[0.5, 0.5],
    normalize=false,
    int8_mask=true,
), dtype="fp16"
