"""Lightning callbacks: media written to the run directory, config stored in checkpoints."""

from src.callbacks.audio_reconstructions import AudioReconstructions
from src.callbacks.code_frequencies import CodeFrequencies
from src.callbacks.config_in_checkpoint import ConfigInCheckpoint
from src.callbacks.reconstruction_grid import ReconstructionGrid

__all__ = ["AudioReconstructions", "CodeFrequencies", "ConfigInCheckpoint", "ReconstructionGrid"]
