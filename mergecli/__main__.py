"""`python -m mergecli` entry point."""

from mergecli.cli import main

if __name__ == "__main__":
    main()
