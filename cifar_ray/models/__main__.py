"""`python -m cifar_ray.models`: every registered model's parameter count and forward GFLOPs per image."""
from __future__ import annotations

import sys

from cifar_ray.models import build_model, list_models, model_spec
from cifar_ray.models.stats import count_parameters, forward_gflops
from cifar_ray.pipes import run_main


def main() -> int:
    print(f"{'model':<13}{'stem':<10}{'params':>14}{'GFLOPs/img':>12}  unsupported  summary")
    for name in list_models():
        spec = model_spec(name)
        for stem in spec.stems:
            model = build_model(name, stem=stem)
            unsupported = ",".join(sorted(spec.unsupported_devices)) or "-"
            print(f"{name:<13}{stem:<10}{count_parameters(model):>14,}{forward_gflops(model):>12.3f}  "
                  f"{unsupported:<11}  {spec.summary}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
