# Translated from the mergekit config arcee_fusion.yml by `mergelang import`.
# mergekit computes this merge in bfloat16 (`dtype`); mergelang always computes in float32.

model_a = model("model_a")
model_b = model("model_b")

output arcee_fusion(model_a, model_b), dtype="bf16"
