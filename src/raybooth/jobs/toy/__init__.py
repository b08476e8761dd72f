"""`raybooth toy build`: train the `toy` and `toy-inpainting` base models on the toy world."""
