base = model("base")
ft0 = model("ft0")
ft1 = model("ft1")
t = match tensor { "self_attn" => 0.2, "mlp" => layers(0.5, 0.9), _ => 0.5 }
output (1 - t) * base + t * avg(dare(ft0 - base, p=0.9), dare(ft1 - base, p=0.9))
