a = model("a")
b = model("b")
one = [a]
pair = [a, b]
trailing = [a, b,]
empty = []
nested = [[1, 2], [3]]
tall = [
    a,
    b - a,
    -1,
]
output avg(
    [a, b]
)
