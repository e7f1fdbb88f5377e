base = model(13)
output base
