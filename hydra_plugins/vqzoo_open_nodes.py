"""An open config node for `configs/quantizer/external.yaml`, so `quantizer.<key>=value` adds a
keyword for the external quantizer's target without Hydra's `+` prefix.

Hydra composes configs in struct mode (an unknown key is an error unless written `+key=...`);
OmegaConf flags cannot be written in YAML, so the open node is registered here, in Python.
Hydra imports every module of the `hydra_plugins` namespace package on the search path before it
composes a config (train.py, eval.py, the tests' `compose`), which is what registers it; nothing
imports this file. Without it (another entry point), external.yaml still composes and keywords
take the `+`: `+quantizer.num_quantizers=4`.
"""

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

ConfigStore.instance().store(
    group="vqzoo_open",
    name="node",
    node=OmegaConf.create({}, flags={"struct": False}),
)
