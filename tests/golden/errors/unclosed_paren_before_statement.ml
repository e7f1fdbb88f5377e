base = model("base")
ft0 = model("ft0")
delta = avg(ft0 - base,
            ft0 - base
output base + delta
