base = model("base")
ft = model("ft")
ramp = layers(0, 1)
curve = layers(0.1, 0.5,
               0.9, 1.0)
flat = layers(0.3)
output base + ramp * curve * flat * (ft - base)
