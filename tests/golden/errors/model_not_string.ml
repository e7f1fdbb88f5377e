base = model("base")
ft0 = model(base)
output ft0
