def ping(x) = pong(x)
def pong(x) = 0.5 * ping(x)
base = model("base")
output ping(base)
