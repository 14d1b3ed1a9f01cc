from .env import DistEnv, init_distributed

__all__ = ["DistEnv", "init_distributed"]
