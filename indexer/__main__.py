"""``python -m indexer``: the same command line as ``faceindex``."""

from indexer.cli import main

if __name__ == "__main__":
    main()
