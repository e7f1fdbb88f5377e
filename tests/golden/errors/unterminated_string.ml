base = model("base)
output base
