"""Ray only lives here: replica actors, the bounded-window executor, the driver's connection."""
from .driver import plan_replicas, ray_executor
from .executor import ClusterError, RayExecutor, address_parts, check_address, connect

__all__ = ["ClusterError", "RayExecutor", "address_parts", "check_address", "connect", "plan_replicas", "ray_executor"]
