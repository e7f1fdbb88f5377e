# Translated from the mergekit config slices_with_merges.yml by `mergelang import`.

a = model("org/a")
b = model("org/b")
c = model("org/c")

output stack(
    slerp(layer_range(a, 0, 16), layer_range(b, 8, 24), t=layers(0, 1)),
    slerp(
        layer_range(b, 16, 32),
        layer_range(a, 16, 32),
        t=match tensor { "mlp" => 0.25, _ => 0.5 },
    ),
    slerp(
        layer_range(c, 30, 32),
        layer_range(a, 30, 32),
        t=match tensor { "mlp" => 0.25, _ => 0.5 },
    ),
)
