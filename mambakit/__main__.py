"""`python -m mambakit ...` and `torchrun --nproc_per_node=K -m mambakit <app> train ...`."""

from mambakit.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
