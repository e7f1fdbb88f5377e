base = model("base")
ft0 = model("ft0")
output base + dare(ft0 - base, p=0.9, seed=1, p=0.5)
