base = model("base")
ft0 = model("ft0")
ft1 = model("ft1")
output base + averge(ft0 - base, ft1 - base)
