# A spec may start with comments.

# Blank lines and comment-only lines between statements are ignored.
base = model("base")   # a trailing comment

   # an indented comment
ft = model("ft")
#no space after the hash
output base + (ft - base)  # the last line has a comment too
