base = model("base")
ft0 = model("ft0")
t = match tensor { "mlp" 0.5, _ => 0.1 }
output base + t * (ft0 - base)
