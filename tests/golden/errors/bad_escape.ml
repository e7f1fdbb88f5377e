base = model("C:\models\llama")
output base
