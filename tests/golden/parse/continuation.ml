base = model("base")
ft = model("ft")
delta =
    ft - base
scaled = 0.5 *
    delta
total = base +
    scaled -
    delta /
    4
joined = base \
    + delta
output total + joined
