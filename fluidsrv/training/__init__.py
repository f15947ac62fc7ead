"""Training loops for the embedded models: data, augmentation, configs and the StyleGAN2 loop."""
