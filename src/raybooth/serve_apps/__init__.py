"""See DESIGN.md: this part depends only on raybooth.platform."""
