"""Hardware profiles, roofline costs of ops and fused kernels, and DAG-aware extraction."""
from costmodel.hardware import HardwareProfile, current_profile
from costmodel.roofline import Cost

__all__ = ["HardwareProfile", "current_profile", "Cost"]
