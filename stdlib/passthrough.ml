# Passthrough (mergekit's `passthrough`): one model's tensors, optionally multiplied by `scale`
# (per tensor with layers(...) or match tensor { ... }). With slices of layers, this is how
# mergekit builds "frankenmerges"; here it copies (and scales) one model.
def passthrough(x, scale=1) = x * scale
