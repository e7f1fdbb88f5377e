base = model("base")
ft0 = model("ft0")
output base + dare(p=0.9, ft0 - base)
