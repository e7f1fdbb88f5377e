i = 42
z = 0
f = 0.5
g = .25
h = 2.
e1 = 1e-3
e2 = 2.5E+2
e3 = 7e2
s = "plain"
q = "say \"hi\""
b = "back\\slash\tand tab"
u = "caf\u00e9 \x41"
empty = ""
yes = true
no = false
output [i, z, f, g, h, e1, e2, e3, s, q, b, u, empty, yes, no]
