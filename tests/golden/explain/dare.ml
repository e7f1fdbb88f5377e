# A DARE merge of two fine-tunes onto their base.
base = model("base")
ft0  = model("ft0")
ft1  = model("ft1")

output base + avg(dare(ft0 - base, p=0.9), dare(ft1 - base, p=0.9))
