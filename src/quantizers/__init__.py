"""The quantizer zoo: plain nn.Modules with the reference library's API, built by name."""

from src.quantizers.binary_mapper import BinaryMapper, BinaryMapperOutput, BinaryMapperQuantizer
from src.quantizers.communicator import Communicator, SingleProcess, install_communicator
from src.quantizers.contract import (
    MASKED,
    IndexLayout,
    IndexRangeError,
    QuantizerContract,
    aux_loss,
    check_contract,
    check_index_range,
    index_layout,
    index_slots,
    slots_to_indices,
)
from src.quantizers.evo_lfq import EvoLFQ, EvoLFQOutput
from src.quantizers.external import ExternalOutput, ExternalQuantizer
from src.quantizers.fsp import FSP, FSPOutput
from src.quantizers.fsq import FSQ, FSQOutput
from src.quantizers.hierarchical_vq import HierarchicalVQ, HierarchicalVQOutput
from src.quantizers.latent_quantize import LatentQuantize, LatentQuantizeOutput
from src.quantizers.lfq import BSQ, LFQ, LFQOutput
from src.quantizers.random_projection import RandomProjectionQuantizer
from src.quantizers.registry import (
    UnknownQuantizerError,
    build_quantizer,
    quantizer_class,
    register_quantizer,
    registered_quantizers,
)
from src.quantizers.residual import ResidualStack, ResidualStackOutput
from src.quantizers.residual_fsq import GroupedResidualFSQ, ResidualFSQ, ResidualFSQOutput
from src.quantizers.residual_lfq import GroupedResidualLFQ, ResidualLFQ, ResidualLFQOutput
from src.quantizers.residual_simvq import ResidualSimVQ, ResidualSimVQOutput
from src.quantizers.residual_vq import (
    GroupedResidualVQ,
    ResidualVQ,
    ResidualVQCodesOutput,
    ResidualVQOutput,
    SharedResidualVQ,
)
from src.quantizers.sequential import Sequential
from src.quantizers.simvq import SimVQ, SimVQOutput
from src.quantizers.vector_quantize import VectorQuantize, VQOutput

__all__ = [
    "BSQ",
    "FSP",
    "FSQ",
    "LFQ",
    "MASKED",
    "BinaryMapper",
    "BinaryMapperOutput",
    "BinaryMapperQuantizer",
    "Communicator",
    "EvoLFQ",
    "EvoLFQOutput",
    "ExternalOutput",
    "ExternalQuantizer",
    "FSPOutput",
    "FSQOutput",
    "GroupedResidualFSQ",
    "GroupedResidualLFQ",
    "GroupedResidualVQ",
    "HierarchicalVQ",
    "HierarchicalVQOutput",
    "IndexLayout",
    "IndexRangeError",
    "LFQOutput",
    "LatentQuantize",
    "LatentQuantizeOutput",
    "QuantizerContract",
    "RandomProjectionQuantizer",
    "ResidualFSQ",
    "ResidualFSQOutput",
    "ResidualLFQ",
    "ResidualLFQOutput",
    "ResidualSimVQ",
    "ResidualSimVQOutput",
    "ResidualStack",
    "ResidualStackOutput",
    "ResidualVQ",
    "ResidualVQCodesOutput",
    "ResidualVQOutput",
    "Sequential",
    "SharedResidualVQ",
    "SimVQ",
    "SimVQOutput",
    "SingleProcess",
    "UnknownQuantizerError",
    "VQOutput",
    "VectorQuantize",
    "aux_loss",
    "build_quantizer",
    "check_contract",
    "check_index_range",
    "index_layout",
    "index_slots",
    "install_communicator",
    "quantizer_class",
    "register_quantizer",
    "registered_quantizers",
    "slots_to_indices",
]
