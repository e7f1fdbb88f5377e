base = model("base")
ft = model("ft")
output base + 0.5 * (ft - base), tokenizer=ft, config=base,
       chat_template="{{ messages }}", dtype="bf16"
