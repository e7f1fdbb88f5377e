# A "frankenmerge": a deeper model stacked from layer ranges of others (mergekit's passthrough
# slices). Output layers 0-1 are ft0's layers 0-1; layers 2-3 are ft1's layers 0-1 mixed with the
# base's, more of ft1 with depth. Embeddings come from the first part, the final norm and head from
# the last; config.json gets num_hidden_layers = 4.
base = model("models/base")
ft0  = model("models/ft0")
ft1  = model("models/ft1")

output stack(
    layer_range(ft0, 0, 2),
    linear([layer_range(ft1, 0, 2), layer_range(base, 0, 2)], weights=[layers(0.5, 0.9), 0.5]),
)
