"""Encoders/decoders, losses and the tokenizer LightningModules."""
