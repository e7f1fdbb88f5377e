base = model("base")
ft = model("ft")
d = dare(ft - base, 0.9, seed=3)
e = dare(ft - base,
         p=0.5,
         seed=1,)
f = avg(
    dare(ft - base, p=0.9),
    ft,
)
g = sum(avg(ft, base), base)
output base + avg(d, e, f, g)
