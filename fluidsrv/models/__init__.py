"""Networks only, one file each, each configured by a frozen dataclass (StyleGAN2, e4e, ...)."""
