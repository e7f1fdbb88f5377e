# Per-tensor weights: attention mostly from ft0, MLPs from ft1 with a weight that grows with depth,
# everything else (embeddings, norms, head) an even mix.
base = model("models/base")
ft0  = model("models/ft0")
ft1  = model("models/ft1")

t = match tensor {
    "self_attn" => 0.2,
    "mlp"       => layers(0.3, 0.9),
    _           => 0.5,
}
output (1 - t) * ft0 + t * ft1
