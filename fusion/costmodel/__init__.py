"""Hardware profiles (calibrated here, datasheets for GPUs), roofline costs of ops and fused kernels."""
from fusion.costmodel.hardware import HardwareProfile
from fusion.costmodel.profile_store import current_profile
from fusion.costmodel.roofline import Cost

__all__ = ["HardwareProfile", "current_profile", "Cost"]
