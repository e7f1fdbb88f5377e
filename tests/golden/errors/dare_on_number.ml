base = model("base")
output base + dare(0.5, p=0.9)
