base = model("base")
ft0 = model("ft0")
ft1 = model("ft1")
deltas = [ft0, ft1] - base
output base + sum([0.5, 0.3, 0.2] * deltas)
