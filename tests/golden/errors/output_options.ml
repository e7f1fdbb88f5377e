base = model("base")
ft = model("ft")
output base + 0.5 * (ft - base), tokenizer=ft - base, tokenzier=ft, config=3, dtype="bf17"
