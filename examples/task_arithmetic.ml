# Task arithmetic with a helper function: the deltas are weighted per model, then scaled.
base = model("models/base")
ft0  = model("models/ft0")
ft1  = model("models/ft1")

def delta(m, w) = w * (m - base)

output base + 0.8 * sum([delta(ft0, 0.6), delta(ft1, 0.4)])
