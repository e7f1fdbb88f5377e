# SLERP: spherical linear interpolation between two models, one tensor at a time (Shoemake 1985;
# mergekit's `slerp`). With θ the angle between the two tensors (as flat vectors),
#   slerp = sin((1-t)θ)/sin θ · base + sin(tθ)/sin θ · other,
# and (1-t)·base + t·other where they are nearly parallel (|cos θ| > 0.9995). t = 0 gives base,
# t = 1 gives other; t may vary per tensor: t=layers(0, 0.5, 1) or t=match tensor { ... }.
# A tensor whose norm is at most 1e-8 counts as having norm 1 (so its cosine with anything is ~0).
def slerp(base, other, t) = arc(base, other, cosine(base, other, eps=1e-8, guard="unit"), t=t)
