"""Ray only lives here: replica actors, the bounded-window executor, the driver's connection."""
from .driver import cluster_has_gpus, plan_replicas, ray_executor, ray_session
from .executor import ClusterError, RayExecutor, address_parts, check_address, connect

__all__ = ["ClusterError", "RayExecutor", "address_parts", "check_address", "cluster_has_gpus", "connect", "plan_replicas",
           "ray_executor", "ray_session"]
