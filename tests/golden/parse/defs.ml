def blend(a, b, t=0.5) = (1 - t) * a + t * b
def scaled(x, k=2, bias=-1,) =
    k * x + bias
def nothing_default(x) = x
a = model("a")
b = model("b")
output blend(a, b, t=scaled(0.25, k=1)) + nothing_default(a)
