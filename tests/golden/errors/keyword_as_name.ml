base = model("base")
true = 0.5
output base
