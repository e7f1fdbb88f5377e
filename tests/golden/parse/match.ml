base = model("base")
ft = model("ft")
t = match tensor { "self_attn" => 0.2, "mlp" => layers(0.5, 0.9), _ => 0.5 }
w = match tensor {
    "model.layers.*.self_attn.*" => 1
    "embed" => -0.5,
    _ => 0
}
one = match tensor { _ => 1 }
trailing = match tensor { "norm" => 1, _ => 0, }
output (1 - t) * base + t * ft + w * one * trailing
