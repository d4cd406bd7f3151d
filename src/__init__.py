"""vqzoo: discrete tokenizers of images and audio with a zoo of quantizers."""
