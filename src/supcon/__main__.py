"""``python -m supcon`` is the command line (also under ``torchrun``)."""

from supcon.cli import main

if __name__ == "__main__":
    main()
