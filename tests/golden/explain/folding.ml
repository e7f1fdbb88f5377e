base = model("base")
ft0 = model("ft0")
ft1 = model("ft1")
w = (1 + 1) / 4
output base * 1 + w * (ft0 - base) + (1 - w) * (ft1 - base) + 0
