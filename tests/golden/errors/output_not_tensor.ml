base = model("base")
weight = 0.5
output weight * 2
