base = model("base")
output base + 0.5 * delta
ft0 = model("ft0")
delta = ft0 - base
