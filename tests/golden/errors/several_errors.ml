base = model("base")
ft0 = model("ft0")
delta = ft0 - bsae
delta = dare(ft0 - base, p="high")
output base + dlta
