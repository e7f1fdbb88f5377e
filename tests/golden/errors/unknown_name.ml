base = model("base")
ft0 = model("ft0")
output bsae + (ft0 - bsae)
