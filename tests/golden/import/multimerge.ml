# Translated from the mergekit config multimerge.yml by `mergelang import`.

mistral_7b_v0_1 = model("mistralai/Mistral-7B-v0.1")
biomistral_7b = model("BioMistral/BioMistral-7B")
hermes_2_pro_mistral_7b = model("NousResearch/Hermes-2-Pro-Mistral-7B")
openhermes_2_5_mistral_7b = model("teknium/OpenHermes-2.5-Mistral-7B")

first_merge = linear([mistral_7b_v0_1, biomistral_7b], weights=[0.5, 0.5])
second_merge = slerp(first_merge, hermes_2_pro_mistral_7b, t=0.5)
output dare_ties(
    mistral_7b_v0_1,
    [second_merge, openhermes_2_5_mistral_7b],
    weights=[0.5, 0.5],
    density=[0.6, 0.8],
)
