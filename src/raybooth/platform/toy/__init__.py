"""The toy world: coloured shapes with captions, a pixel judge, a subject the grammar cannot
express, and the `toy` / `toy-inpainting` models raybooth trains on it (see `raybooth toy build`)."""
