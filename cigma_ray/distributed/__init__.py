"""Ray only lives here: the driver that spreads units over replica actors."""
from .driver import plan_replicas, run_on_ray
from .executor import ClusterError, Failure, RayExecutor, check_address, connect

__all__ = ["ClusterError", "Failure", "RayExecutor", "check_address", "connect", "plan_replicas", "run_on_ray"]
