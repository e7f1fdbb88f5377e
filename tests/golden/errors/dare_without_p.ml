base = model("base")
ft0 = model("ft0")
output base + dare(ft0 - base)
