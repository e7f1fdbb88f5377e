base = model("base")
ft0 = model("ft0")
output base
    + 0.5 * (ft0 - base)
