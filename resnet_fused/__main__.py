"""``python -m resnet_fused``: the same command line as the ``resnet-fused`` script."""
from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
