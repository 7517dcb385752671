"""cifar_ray: CIFAR-10 sweeps on Ray Tune."""

__version__ = "0.1.0"
