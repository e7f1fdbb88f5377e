# Translated from the mergekit config config.yml by `mergelang import`.

base = model("base")
ft0 = model("ft0")
ft1 = model("ft1")
ft2 = model("ft2")

output task_arithmetic(
    base,
    [ft0, ft1, ft2],
    weights=[
        layers(0.2, 1.0),
        match tensor { "self_attn" => -0.4, "mlp" => layers(0.9, 0.1), _ => 0.3 },
        match tensor { "mlp" => layers(0.9, 0.1), _ => 0.3 },
    ],
    normalize=true,
    lambda=0.8,
)
