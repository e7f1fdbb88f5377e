base = model("base")
ft0 = model("ft0")
output base
output ft0
