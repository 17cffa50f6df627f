"""preprocess.py - not implemented yet (see the deployment issue)."""
import sys

from src.model_utils.config import get_config


def main():
    get_config(description="FCOS preprocess")
    print("preprocess.py: not implemented yet", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
    main()
