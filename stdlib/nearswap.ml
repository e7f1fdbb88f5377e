# NearSwap (mergekit's `nearswap`; https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001):
# take `other` where it is close to `base` and keep `base` where they differ: entry by entry,
# w = clamp(t / max(|base - other|, 1e-6), 0, 1) and the result is w·other + (1-w)·base.
def nearswap(base, other, t) = _nearswap(base, other, clamp(t / clamp(abs(base - other), min=1e-6), min=0, max=1))

def _nearswap(a, b, w) = w * b + (1 - w) * a
