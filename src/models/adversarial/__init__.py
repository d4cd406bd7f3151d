"""Adversarial training of the tokenizers: discriminators, GAN losses, VQGAN's adaptive weight,
EnCodec's loss balancer, and the manual-optimisation training step (training.py)."""
