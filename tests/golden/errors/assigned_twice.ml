base = model("base")
ft0 = model("ft0")
delta = ft0 - base
delta = 0.5 * delta
output base + delta
