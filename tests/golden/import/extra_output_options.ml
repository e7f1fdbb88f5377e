# Translated from the mergekit config output_options.yml by `mergelang import`.
# note: ignored `parameters.densty` (line 12): `dare_linear` does not use `densty`
# note: ignored `models[0].parameters.t` (line 6): `dare_linear` does not use `t`

llama_2_7b_hf = model("meta-llama/Llama-2-7b-hf", revision="main")
llama_2_7b_hf_llama_lora = llama_2_7b_hf + lora("someone/llama-lora", base=llama_2_7b_hf)
vicuna_7b_v1_5 = model("lmsys/vicuna-7b-v1.5")

output dare_linear(
    llama_2_7b_hf,
    [llama_2_7b_hf_llama_lora, vicuna_7b_v1_5],
    weights=[0.6, 0.4],
    density=[0.3, 0.5],
    rescale=false,
), tokenizer=vicuna_7b_v1_5, chat_template="{% for m in messages %}{{ m['content'] }}\n{% endfor %}", dtype="bf16"
