"""Fine-grained gated fusion of k LoRAs (AutoLoRA eq. 6-8), the global LoRA, and the diffusers patcher."""

from models.fusion.branches import LoraBranches
from models.fusion.fused_linear import FusedLinear
from models.fusion.gate import FusionGate, timestep_features
from models.fusion.global_lora import global_lora
from models.fusion.patcher import GatedFusion, Lora, block_linear_names

__all__ = ["FusedLinear", "FusionGate", "GatedFusion", "Lora", "LoraBranches", "block_linear_names",
           "global_lora", "timestep_features"]
