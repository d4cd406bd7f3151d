"""The quantizer zoo: plain nn.Modules with the reference library's API, built by name."""

from src.quantizers.communicator import Communicator, SingleProcess, install_communicator
from src.quantizers.fsq import FSQ, FSQOutput
from src.quantizers.latent_quantize import LatentQuantize, LatentQuantizeOutput
from src.quantizers.lfq import BSQ, LFQ, LFQOutput
from src.quantizers.registry import (
    UnknownQuantizerError,
    build_quantizer,
    quantizer_class,
    register_quantizer,
    registered_quantizers,
)
from src.quantizers.simvq import SimVQ, SimVQOutput
from src.quantizers.vector_quantize import VectorQuantize, VQOutput

__all__ = [
    "BSQ",
    "FSQ",
    "LFQ",
    "Communicator",
    "FSQOutput",
    "LFQOutput",
    "LatentQuantize",
    "LatentQuantizeOutput",
    "SimVQ",
    "SimVQOutput",
    "SingleProcess",
    "UnknownQuantizerError",
    "VQOutput",
    "VectorQuantize",
    "build_quantizer",
    "install_communicator",
    "quantizer_class",
    "register_quantizer",
    "registered_quantizers",
]
